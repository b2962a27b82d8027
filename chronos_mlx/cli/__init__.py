"""The `chronos` command line: a thin typer + rich layer over `chronos_mlx.load` and its decode loop.

One module per command (like mlx_lm's): `generate`, `chat`, `serve`, `doctor`, `info`, `bench`, `profile`
(record/list/show/diff and `pack`), `predictor` (train/eval). `common` holds what they share.

Conventions:
- Generated text goes to stdout; everything else (notices, summaries, spinners) to stderr,
  so `chronos generate ... > out.txt` captures only the text and `--json` prints exactly
  one JSON object on stdout.
- User errors (`ChronosError`: bad model, budget, shard, profile, options) end the command
  with one red `error: <message>` line on stderr and exit code 2, never a traceback.
- The options that say how to load a model are declared once (`common.LOAD_OPTIONS`) and
  turned into `chronos_mlx.load` keyword arguments in one place (`LoadOptions.load_kwargs`).
"""

from typing import Annotated

import typer

from . import bench, chat, doctor, generate, info, serve, verify  # noqa: F401  (each registers its command on `app`)
from .app import app
from .common import out
from .predictor import predictor_app
from .profile import pack, profile_app

app.add_typer(profile_app, name="profile")
app.add_typer(predictor_app, name="predictor")
app.command(name="pack")(pack)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)] = False,
):
    if version:
        from .. import __version__

        out.print(f"chronos-mlx {__version__}")
        raise typer.Exit()


__all__ = ["app"]
