"""Writing a script's results: JSON, atomically (an interrupted run leaves the old file or none)."""

from __future__ import annotations

import json
from pathlib import Path


def save_json(path, data, indent: int = 1) -> None:
    """Write `data` to `path`; no path (no --json given): nothing."""
    if not path:
        return
    from chronos_mlx.profiles import atomic_write_text

    atomic_write_text(Path(path), json.dumps(data, indent=indent))
