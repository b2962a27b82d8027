"""`chronos verify`: sha256 of every shard, checked against the Hugging Face cache or the
model's manifest (written by the first run), with a progress bar; `--tokens`: chronos's greedy
tokens against stock mlx_lm's on this machine."""

import json
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import app
from .common import DTYPE_HELP, CliError, DtypeChoice, err, error_line, hint_line, human_bytes, note_line, out, user_errors


def hashing_progress(description: str):
    """A rich progress bar over bytes (stderr; transient when stderr is not a terminal)
    and the on_start / on_bytes callbacks that drive it."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    bar = Progress(TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=err, transient=not err.is_terminal)
    task = bar.add_task("hash", total=None)
    return bar, (lambda total: bar.update(task, total=total)), (lambda n: bar.advance(task, n))


@app.command()
@user_errors
def verify(
    model: Annotated[
        Optional[str],
        typer.Argument(metavar="[MODEL]", help="Model directory or Hugging Face repo id (default: the demo model)."),
    ] = None,
    update: Annotated[
        bool, typer.Option("--update", help="Record a new manifest from the files as they are now (after a deliberate change).")
    ] = False,
    tokens: Annotated[
        bool,
        typer.Option("--tokens", help="Instead of the shards: decode greedily with stock mlx_lm and with chronos at "
                     "--budgets on this machine and compare the tokens (stock loads the whole model: use a small "
                     "model of the same architecture and quantization)."),
    ] = False,
    budgets: Annotated[str, typer.Option("--budgets", metavar="B,B", help="With --tokens: expert budgets to check.")] = "0.5,0.125",
    routing: Annotated[
        Optional[str], typer.Option("--routing", metavar="MODE,MODE", help="With --tokens: decode routings to check "
                                    "(optimistic, per-layer; device-wait, device-fetch on CUDA). Default: every one this machine runs.")
    ] = None,
    prompt: Annotated[
        Optional[list[str]], typer.Option("--prompt", "-p", metavar="TEXT", help="With --tokens: a prompt (repeat for more). Default: a short and a long one.")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="With --tokens: greedy tokens per prompt.")] = 16,
    predictor: Annotated[
        Optional[str], typer.Option("--predictor", help="With --tokens: attach this predictor (gate, markov, lookahead, ...) "
                                    "to every chronos run, so its prefetches are checked too.")
    ] = None,
    dtype: Annotated[DtypeChoice, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
):
    """Check a model's shards: sha256 of every shard against what the Hugging Face cache
    records (its blob names are sha256 hashes) or the manifest the first run wrote. With
    --tokens: check that chronos decodes stock mlx_lm's greedy tokens on this machine.

    The first run records the manifest (shard hashes and one hash per expert, used by
    [bold]--verify-experts[/bold]) in ~/.cache/chronos-mlx/manifests (or
    $CHRONOS_MANIFEST_DIR); later runs check against it. Exit code 0: every shard
    matches (every token, with --tokens); 1: a shard (a token) does not; 2: usage errors.

    [bold]Examples[/bold]

    [cyan]chronos verify mlx-community/Qwen3-30B-A3B-4bit[/cyan]

    [cyan]chronos generate -m ./my-model --verify-experts -p "Hello"[/cyan]

    [cyan]chronos verify --tokens[/cyan]            (the demo model's tokens against stock mlx_lm, here)
    """
    if tokens:
        return _verify_tokens(model, budgets, routing, prompt, max_tokens, dtype, as_json, predictor)
    from ..verify import verify_model

    bar, on_start, on_bytes = hashing_progress("sha256")
    with bar:
        report = verify_model(model, update=update, on_start=on_start, on_bytes=on_bytes)
    if as_json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
    else:
        table = Table(title=f"{escape(report.model.name)} · {len(report.shards)} shard(s)", title_justify="left")
        for col in ("shard", "size", "sha256", "checked against", "result"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for s in report.shards:
            result = "[green]ok[/green]" if s.expected is not None and s.ok else (
                "[red]MISMATCH[/red]" if not s.ok else "[yellow]recorded[/yellow]")
            against = {"huggingface": "Hugging Face blob name", "manifest": "manifest", "recorded": "-"}[s.source]
            table.add_row(escape(s.name), human_bytes(s.size), s.sha256[:16] + "...", against, result)
        out.print(table)
        if report.manifest_written:
            err.print(f"manifest written: {escape(str(report.manifest))}", soft_wrap=True)
    if not report.ok:
        bad = report.bad
        error_line(
            f"{len(bad)} of {len(report.shards)} shard(s) do not match: "
            + ", ".join(f"{s.name} (sha256 {s.sha256[:12]}..., expected {s.expected[:12]}...)" for s in bad)
        )
        hint_line("the file is corrupt or was changed: download it again (or `chronos verify --update` if the change is deliberate)")
        raise typer.Exit(1)
    if not as_json:
        err.print(f"[green]verified[/green] {human_bytes(sum(s.size for s in report.shards))} in {report.seconds:.1f} s",
                  soft_wrap=True)


def _verify_tokens(model, budgets, routing, prompts, max_tokens, dtype, as_json, predictor=None):
    """`chronos verify --tokens`: exit 0 when every check gives stock's tokens, 1 otherwise."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..equivalence import check_against_stock

    try:
        levels = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise CliError(f"--budgets takes fractions like 0.5,0.125, got '{budgets}'") from None
    if not levels or not all(0 < b <= 1 for b in levels):
        raise CliError(f"--budgets takes fractions in (0, 1], got '{budgets}'")
    from ..generate import available_sync_modes

    modes = [m.strip() for m in routing.split(",") if m.strip()] if routing else available_sync_modes()
    n_prompts = len(prompts) if prompts else 2
    bar = Progress(TextColumn("comparing tokens"), BarColumn(), MofNCompleteColumn(), console=err,
                   transient=not err.is_terminal)
    task = bar.add_task("tokens", total=len(levels) * len(modes) * n_prompts)
    with bar:
        report = check_against_stock(model, budgets=levels, routings=modes, prompts=prompts, max_tokens=max_tokens,
                                     dtype=None if dtype == "auto" else dtype,
                                     on_check=lambda _: bar.advance(task), predictor=predictor)
    if as_json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
    else:
        table = Table(title=f"{escape(report.model.name)} · {report.device} · {report.dtype} · greedy tokens vs stock mlx_lm",
                      title_justify="left")
        for col in ("prompt", "budget", "routing", "result"):
            table.add_column(col, justify="right" if col in ("prompt", "budget") else "left")
        for c in report.checks:
            if not c.exact:
                result = f"[red]DIFFERS at token {c.first_difference}[/red]"
            elif c.compared < c.tokens:
                result = f"[yellow]identical for the {c.compared} of {c.tokens} tokens stock repeats[/yellow]"
            else:
                result = f"[green]identical ({c.tokens} tokens)[/green]"
            table.add_row(f"{c.prompt} ({c.prompt_tokens} tok)", f"{c.budget:g}",
                          c.routing + (f" + {escape(predictor)}" if predictor else ""), result)
        out.print(table)
        if not report.stock_deterministic:
            note_line("stock mlx_lm itself decoded different tokens in two runs on this device (its best logits "
                      "tie); past the point where its runs part there is no one reference, so only the tokens "
                      "before it were compared")
    if not report.ok:
        bad = [c for c in report.checks if not c.exact]
        error_line(f"{len(bad)} of {len(report.checks)} check(s) differ from stock mlx_lm on {report.device}")
        hint_line("please report it with `chronos verify --tokens --json` and your mlx / mlx-lm versions; "
                  "until fixed, a budget of 1.0 runs every expert resident")
        raise typer.Exit(1)
