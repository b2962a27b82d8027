"""Ctrl-C while the `chronos` command is still importing (mlx, mlx_lm, transformers take
seconds on a cold or busy machine): end quietly with exit code 130 instead of a traceback
from deep inside an import. The CLI's app restores Python's own handler as soon as it
runs (`end_startup`). Library use (`import chronos_mlx`) is not affected."""

import os
import signal
import sys


def _handler(signum, frame):
    try:
        sys.stderr.write("\naborted\n")
        sys.stderr.flush()
    finally:
        os._exit(130)  # nothing has started yet: no state to save


def quiet_startup_interrupts():
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _handler)
    except (ValueError, OSError):  # not the main thread
        pass


def end_startup():
    try:
        if signal.getsignal(signal.SIGINT) is _handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except (ValueError, OSError):
        pass


def is_cli_process() -> bool:
    """The `chronos` console script, or `python -m chronos_mlx.cli` (argv[0] is '-m' while
    the module is being located, which is when this package is imported)."""
    arg0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(arg0) == "chronos" or arg0 == "-m"
