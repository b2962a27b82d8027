"""`chronos doctor`: will this model run here, with which budget, and how fast (before any weight is read)."""

import json
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import common
from .app import app
from .common import DTYPE_HELP, MODEL_HELP, CliError, DtypeChoice, human_bytes, model_name, out, user_errors


def _rate(x) -> str:
    return "-" if x is None else (f"{x:,.0f} tok/s" if x >= 10 else f"{x:.2f} tok/s")


def _bw(x) -> str:
    return "-" if x is None else f"{human_bytes(x)}/s"


@app.command()
@user_errors
def doctor(
    model: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help=MODEL_HELP, show_default=False)] = None,
    model_opt: Annotated[Optional[str], typer.Option("--model", "-m", metavar="PATH|REPO", help="Same as MODEL.")] = None,
    dtype: Annotated[DtypeChoice, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    memory_limit: Annotated[
        Optional[str], typer.Option("--memory-limit", metavar="SIZE", help="Memory the process may use (e.g. 12GB). Default: the machine's available memory.")
    ] = None,
    context: Annotated[int, typer.Option("--context", min=1, help="Tokens of KV cache to plan for.")] = 4096,
    measure: Annotated[
        bool,
        typer.Option(
            "--measure",
            help="Also measure the hit-rate curve: generate a few tokens at the recommended budget, record "
            "the routing and replay it through LRU caches of every size (this reads weights).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
):
    """Check a model against this machine before loading it.

    What the model needs (dense weights, experts, bytes per expert, KV cache per 1k tokens),
    what the machine has (available memory, measured read and memory bandwidth), the
    budget `--expert-budget auto` would choose, and the expected decode speed from the I/O
    model: tokens/s <= min(resident speed, read bandwidth / bytes read per token). Only
    config and shard headers are read, unless --measure.

    [bold]Examples[/bold]

    [cyan]chronos doctor[/cyan]                                  (the embedded demo model)

    [cyan]chronos doctor ~/models/Qwen3-30B-A3B-4bit --memory-limit 12GB --json[/cyan]
    """
    from ..doctor import diagnose

    if model and model_opt and model != model_opt:
        raise CliError("give the model once: as MODEL or as --model")
    report = diagnose(
        model or model_opt, dtype=None if dtype == "auto" else dtype, memory_limit=memory_limit,
        context_tokens=context, measure=measure,
    )
    if as_json:
        common._write(json.dumps(report, default=str) + "\n")
        return
    m, needs, mach, rec, speed = report["model"], report["needs"], report["machine"], report["recommendation"], report["speed"]

    grid = Table(show_header=False, box=None, pad_edge=False, title="what the model needs", title_justify="left")
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("model", f"[bold]{escape(model_name(m))}[/bold] ({m['model_type']}, {m['moe_layers']} MoE layers)")
    if m.get("num_experts"):
        grid.add_row("experts", f"{m['num_experts']} per layer, top-{m['top_k']}: {human_bytes(needs['expert_bytes_total'])} in all")
        grid.add_row("per expert", f"{human_bytes(needs['bytes_per_expert'])} resident, {human_bytes(needs['bytes_per_expert_on_disk'])} on disk")
    grid.add_row("dense weights", human_bytes(needs["dense_bytes"]))
    grid.add_row("KV cache", f"{human_bytes(needs['kv_bytes_per_1k_tokens'])} per 1k tokens ({m['dtype']})")
    grid.add_row("all resident", f"{human_bytes(needs['resident_total_bytes'])} with {needs['context_tokens']} tokens of KV")
    out.print(grid)

    grid = Table(show_header=False, box=None, pad_edge=False, title="this machine", title_justify="left")
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("memory", f"{human_bytes(mach['available_bytes'])} available of {human_bytes(mach['total_bytes'])} ({escape(mach['available_source'])})")
    if mach.get("recommended_working_set_bytes"):
        grid.add_row("Metal working set", human_bytes(mach["recommended_working_set_bytes"]))
    if mach.get("memory_limit_bytes"):
        grid.add_row("--memory-limit", human_bytes(mach["memory_limit_bytes"]))
    read = mach.get("read")
    if read:
        grid.add_row("read bandwidth", f"{_bw(read['bytes_per_s'])} ({human_bytes(read['bytes'])} of {escape(read['file'])}; {read['note']})")
    grid.add_row("memory bandwidth", _bw(mach["memory_bandwidth_bytes_per_s"]))
    grid.add_row("expert loads", escape(mach["expert_writes"]))
    grid.add_row("split reads", escape(mach["split_reads"]))
    modes = mach.get("sync_modes", [])
    grid.add_row("--sync", ", ".join(modes) + f"  (auto: {mach['default_sync']})"
                 + ("" if "device-wait" in modes else "  [dim](device-wait, device-fetch need MLX's CUDA backend)[/dim]"))
    if mach.get("device_fetch"):
        grid.add_row("device-fetch", escape(mach["device_fetch"]["line"]))
    if mach.get("per_layer"):
        grid.add_row("per-layer routing", escape(mach["per_layer"]))
    out.print()
    out.print(grid)

    out.print()
    if rec["fits"]:
        out.print(f"[bold green]recommended:[/bold green] --expert-budget {rec['fraction']:.3g}  [dim]({escape(rec['line'])})[/dim]", soft_wrap=True)
    else:
        out.print(f"[bold red]does not fit:[/bold red] {escape(report['fails'])}", soft_wrap=True)
    if speed["curve"]:
        table = Table(title="expected decode speed (I/O model)", title_justify="left")
        table.add_column("budget", no_wrap=True)
        table.add_column("experts/layer", justify="right", no_wrap=True)
        table.add_column("hit rate", justify="right", no_wrap=True)
        table.add_column("read/token", justify="right", no_wrap=True)
        table.add_column("tokens/s ≤", justify="right", no_wrap=True)
        for p in speed["curve"]:
            mark = " *" if rec.get("fraction") and abs(p["fraction"] - rec["fraction"]) < 1e-12 else ""
            table.add_row(
                f"{p['fraction']:.3g}{mark}", str(p["slots_per_layer"]), f"{p['hit_rate']:.1%}",
                human_bytes(p["bytes_read_per_token"]), _rate(p["tokens_per_s_bound"]),
            )
        out.print()
        out.print(table)
    exp = speed.get("expected_tokens_per_s")
    if exp and exp[0] is not None:
        out.print(f"expected at the recommended budget: {_rate(exp[0])} to {_rate(exp[1])}", soft_wrap=True)
    out.print(f"[dim]resident bound: {_rate(speed['resident_tokens_per_s_bound'])} ({speed['resident_bound_note']}). "
              f"{escape(speed['assumption'])}.[/dim]", soft_wrap=True)
