"""Small checks and writes on output paths, shared by the commands that write files."""

from __future__ import annotations

import os
from pathlib import Path


def check_can_create(path: Path, error: type[Exception], where: Path | None = None) -> None:
    """Raise `error` unless `path` could be created: its nearest existing ancestor must be a
    directory we may write into. Called before long work, so a bad output path costs nothing.
    `where` names the place in the message (default: the nearest existing ancestor)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise error(f"{where or path}: not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise error(f"{where or probe}: cannot write there (permission denied)")
