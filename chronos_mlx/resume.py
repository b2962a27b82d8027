"""Recompute a decode step from the first decoder layer that missed, not from the start.

When an optimistic step used an absent expert in MoE layer m, every layer before m ran
on resident experts and is exact, and so is the hidden state entering m. The decoder
layers are given a thin subclass (same instance, parameters and paths; only `__call__`
differs) that records each layer's input during optimistic steps and, while the runtime
asks to resume from layer m, passes inputs straight through below m, substitutes the
recorded input at m and runs m onwards. Only the KV caches of layers >= m are rolled back.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"^(.*\.layers)\.(\d+)\.")
_SUBCLASSES: dict = {}


class ResumeState:
    """What the resumable layers read: whether to record inputs, and where to resume."""

    def __init__(self):
        self.recording = False
        self.inputs: dict[int, object] = {}  # decoder index -> input of the last optimistic step
        self.start: int | None = None  # resume from this decoder layer ...
        self.start_input = None  # ... with this input


def _resumable(cls):
    if cls not in _SUBCLASSES:

        def __call__(self, x, *args, **kwargs):
            state, index = self._chronos_resume, self._chronos_index
            if state.start is not None:
                if index < state.start:
                    return x  # exact already: this layer's output and KV entry are kept
                if index == state.start:
                    x = state.start_input
            if state.recording:
                state.inputs[index] = x
            return cls.__call__(self, x, *args, **kwargs)

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _SUBCLASSES[cls]


def install(model, switch_paths: list[str]):
    """Make the decoder layers resumable; returns (state, decoder index per MoE layer) or None.

    None when the MoE layers do not sit in one `...layers.<i>` list (then a miss recomputes
    the whole step)."""
    found = [_LAYER.match(p) for p in switch_paths]
    if not all(found) or len({m.group(1) for m in found}) != 1:
        return None
    container = model
    for part in found[0].group(1).split("."):
        container = container[part] if isinstance(container, dict) else getattr(container, part, None)
        if container is None:
            return None
    if not isinstance(container, list):
        return None
    state = ResumeState()
    for i, layer in enumerate(container):
        object.__setattr__(layer, "_chronos_resume", state)
        object.__setattr__(layer, "_chronos_index", i)
        layer.__class__ = _resumable(type(layer))
    return state, [int(m.group(2)) for m in found]
