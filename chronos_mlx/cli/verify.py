"""`chronos verify`: sha256 of every shard, checked against the Hugging Face cache or the
model's manifest (written by the first run), with a progress bar."""

import json
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import app
from .common import err, error_line, hint_line, human_bytes, out, user_errors


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
):
    """Check a model's shards: sha256 of every shard against what the Hugging Face cache
    records (its blob names are sha256 hashes) or the manifest the first run wrote.

    The first run records the manifest (shard hashes and one hash per expert, used by
    [bold]--verify-experts[/bold]) in ~/.cache/chronos-mlx/manifests (or
    $CHRONOS_MANIFEST_DIR); later runs check against it. Exit code 0: every shard
    matches; 1: a shard does not; 2: usage errors.

    [bold]Examples[/bold]

    [cyan]chronos verify mlx-community/Qwen3-30B-A3B-4bit[/cyan]

    [cyan]chronos generate -m ./my-model --verify-experts -p "Hello"[/cyan]
    """
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
