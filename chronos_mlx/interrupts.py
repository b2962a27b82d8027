"""Ctrl-C (SIGINT) and the cache's bookkeeping.

Python raises KeyboardInterrupt in the main thread at whatever bytecode it is running. The
expert cache's state changes (reserve a slot, read, map it, resolve its future) must not
be cut in half: `deferred_sigint()` holds a Ctrl-C that arrives during such a section and
delivers it to the previous handler when the section ends, with the state consistent
again. Off the main thread (reader pool, planner, pre-warm) no KeyboardInterrupt can arrive
and it costs nothing; on the main thread it is two `sigaction` calls, made through `_signal`
(the `signal` module's wrappers convert every handler to an enum, which costs more than the
calls themselves: ~60 us a section in a decode step, where it runs for every MoE layer that
loads).
"""

from __future__ import annotations

import _signal
import signal
import threading
from contextlib import contextmanager


_SIGINT, _SIG_DFL = int(signal.SIGINT), int(signal.SIG_DFL)


class LoadInterrupted(RuntimeError):
    """An expert load was abandoned because the thread running it was interrupted."""


@contextmanager
def deferred_sigint():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    frames = []

    def hold(signum, frame):
        frames.append(frame)

    try:
        previous = _signal.signal(_SIGINT, hold)
    except (ValueError, TypeError, OSError):  # embedded interpreter without signal support
        yield
        return
    try:
        yield
    finally:
        _signal.signal(_SIGINT, previous)
        for frame in frames[:2]:  # each Ctrl-C counts (the CLI: first = stop after this token, second = now)
            if callable(previous):
                previous(signal.SIGINT, frame)  # the default handler raises KeyboardInterrupt here
            elif previous == _SIG_DFL:
                raise KeyboardInterrupt
