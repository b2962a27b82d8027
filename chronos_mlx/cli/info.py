"""`chronos info`: what a model is and what expert budgets mean for it."""

import json
import math
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import common
from .app import app
from .common import MODEL_HELP, DTYPE_HELP, CliError, DtypeChoice, human_bytes, model_name, out, quant_text, user_errors


BUDGET_FRACTIONS = ("1.0", "0.5", "0.25", "0.125")


def minimum_budget(num_experts: int, top_k: int) -> str:
    """The smallest fraction that holds top_k experts per layer, as a user would type it
    (rounded up at the 4th decimal so that it still buys top_k slots)."""
    f = math.ceil(top_k / num_experts * 10**4 - 1e-6) / 10**4
    return f"{f:.4f}".rstrip("0").rstrip(".") if f < 1 else "1.0"


def budget_rows(info: dict) -> list:
    """What the usual budget fractions (and the smallest legal one) buy for this model,
    computed by the same `slots_for_budget` that `load` uses."""
    from ..budget import slots_for_budget
    from ..errors import BudgetError

    E, k, layers, per = info["num_experts"], info["top_k"], info["moe_layers"], info["bytes_per_expert"]
    smallest = minimum_budget(E, k)
    labels = sorted({*BUDGET_FRACTIONS, smallest}, key=float, reverse=True)
    labels = [b for b in labels if not (float(b) == float(smallest) and b != smallest)]
    rows = []
    for label in labels:
        try:
            slots = slots_for_budget(label, num_layers=layers, num_experts=E, top_k=k, bytes_per_expert=per)
        except BudgetError:
            slots = None
        expert_bytes = slots * per * layers if slots is not None else None
        rows.append(
            {
                "budget": label,
                "fraction": float(label),
                "minimum": label == smallest,
                "experts_per_layer": slots,
                "expert_bytes": expert_bytes,
                "resident_bytes": expert_bytes + info["dense_bytes"] if expert_bytes is not None else None,
            }
        )
    return rows


@app.command()
@user_errors
def info(
    model: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help=MODEL_HELP, show_default=False)] = None,
    model_opt: Annotated[
        Optional[str], typer.Option("--model", "-m", metavar="PATH|REPO", help="Same as MODEL.")
    ] = None,
    dtype: Annotated[DtypeChoice, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as one JSON object.")] = False,
):
    """Describe a model and what expert budgets mean for it, without loading its experts.

    Architecture, layers and MoE layers, experts per layer and top-k, bytes per expert
    (resident and on disk), all expert bytes, dense bytes, and a table of budgets.

    [bold]Examples[/bold]

    [cyan]chronos info[/cyan]                       (the embedded demo model)

    [cyan]chronos info ~/models/Qwen3-30B-A3B-4bit --json[/cyan]
    """
    from ..loader import plan_model

    if model and model_opt and model != model_opt:
        raise CliError("give the model once: as MODEL or as --model")
    spec = model if model is not None else model_opt  # "" is an error, not the demo model
    facts = dict(plan_model(spec, None if dtype == "auto" else dtype).info)
    moe = bool(facts.get("moe_layers"))
    facts["moe"] = moe
    if moe:
        facts["budgets"] = budget_rows(facts)
    if as_json:
        common._write(json.dumps(facts, default=str) + "\n")
        return

    grid = Table(show_header=False, box=None, pad_edge=False)
    grid.add_column(style="cyan")
    grid.add_column()
    grid.add_row("model", f"[bold]{escape(model_name(facts))}[/bold]")
    grid.add_row("path", escape(facts["path"]))
    grid.add_row("architecture", str(facts.get("model_type")))
    grid.add_row("layers", f"{facts.get('num_hidden_layers')} ({facts.get('moe_layers')} MoE)")
    grid.add_row("quantization", quant_text(facts.get("quantization")))
    grid.add_row("compute dtype", str(facts.get("dtype")))
    if moe:
        grid.add_row("experts per layer", f"{facts['num_experts']}, top-{facts['top_k']} per token")
        grid.add_row(
            "bytes per expert",
            f"{human_bytes(facts['bytes_per_expert'])} resident, "
            f"{human_bytes(facts['bytes_per_expert_on_disk'])} on disk",
        )
        grid.add_row("all experts", f"{human_bytes(facts['expert_bytes_total'])} resident")
        grid.add_row("dense weights", f"{human_bytes(facts['dense_bytes'])} (always resident)")
    out.print(grid)
    if not moe:
        out.print(
            f"\n[yellow]{escape(model_name(facts))} has no MoE layers:[/yellow] chronos runs it "
            "unchanged, there are no experts to stream and --expert-budget has no effect."
        )
        return

    table = Table(title="expert budgets", title_justify="left")
    table.add_column("--expert-budget")
    table.add_column("experts/layer", justify="right")
    table.add_column("expert memory", justify="right")
    table.add_column("with dense weights", justify="right")
    for row in facts["budgets"]:
        label = row["budget"] + (" (minimum)" if row["minimum"] else "")
        if row["experts_per_layer"] is None:
            table.add_row(label, "[red]too small[/red]", "-", "-")
        else:
            table.add_row(
                label,
                str(row["experts_per_layer"]),
                human_bytes(row["expert_bytes"]),
                human_bytes(row["resident_bytes"]),
            )
    out.print()
    out.print(table)
    out.print(
        f"[dim]A budget in bytes (e.g. 6GB) buys floor(bytes / {human_bytes(facts['bytes_per_expert'] * facts['moe_layers'])}) "
        f"experts per layer; fewer than {facts['top_k']} is an error.[/dim]"
    )



