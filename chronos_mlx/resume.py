"""Recompute a decode step from the first decoder layer that missed, not from the start.

When an optimistic step used an absent expert in MoE layer m, every decoder layer before
m ran on resident experts, so its outputs are exact. The decoder layers are given a thin
subclass (same instance, parameters and paths; only `__call__` differs) that, while a
step is recorded, keeps each layer's output and which cache objects it was handed, and
while the runtime asks to resume from layer s, returns the recorded outputs for layers
below s without running them. The model's own code between layers then computes exactly
what it did the first time, so layer s gets exactly its original inputs, whatever they
are (a hidden state, shared KV states, offsets: nothing is special-cased by model).

Model code outside the layers may read the caches too (llama4 builds its chunk mask from
the first layer's cache before running any layer), so a recomputation runs with every
cache as it was before the step; the caches of the layers below s, which the step left
exact, are put back to their state after the step once the pass is built. A cache shared
by a layer below s and one at or above it moves s down to the first layer that shares it
(`resume_point`).
"""

from __future__ import annotations

import re

from .rollback import leaves

_INDEXED = re.compile(r"\.(\d+)(?=\.|$)")
_SUBCLASSES: dict = {}


class ResumeState:
    """What the resumable layers read and write during one decode step."""

    def __init__(self):
        self.recording = False
        self.outputs: dict[int, object] = {}  # decoder index -> its output in this step
        self.touched: dict[int, set] = {}  # decoder index -> ids of cache objects it was given
        self.start: int | None = None  # resume from this decoder layer ...
        self.replay: dict | None = None  # ... returning these outputs below it
        self.replay_touched: dict = {}  # ... and counting the caches they touched then
        self._known: dict[int, tuple] = {}  # id(cache object or CacheList) -> ids of its leaves

    def bind(self, prompt_cache):
        """Know the cache objects of this generation (to attribute them to layers)."""
        known = {}
        for c in prompt_cache:
            known[id(c)] = tuple(id(x) for x in leaves([c]))
            for leaf in leaves([c]):
                known[id(leaf)] = (id(leaf),)
        self._known = known

    def caches_in(self, args, kwargs) -> set:
        found = set()
        for v in (*args, *kwargs.values()):
            hit = self._known.get(id(v))
            if hit is not None:
                found.update(hit)
            elif isinstance(v, (list, tuple)):
                for item in v:
                    found.update(self._known.get(id(item), ()))
        return found


def resume_point(first: int, touched: dict) -> int:
    """The earliest decoder layer a recomputation must start at to redo layer `first`:
    lowered while a cache object used at or above it was also used below it."""
    start = first
    while True:
        above = set().union(*(ids for i, ids in touched.items() if i >= start))
        shared = [i for i, ids in touched.items() if i < start and ids & above]
        if not shared:
            return start
        start = min(shared)


def kept_caches(start: int, touched: dict) -> set:
    """Ids of the cache objects only layers below `start` advanced: they stay as they are."""
    return set().union(*(ids for i, ids in touched.items() if i < start))


def _resumable(cls):
    if cls not in _SUBCLASSES:

        def __call__(self, *args, **kwargs):
            state, index = self._chronos_resume, self._chronos_index
            ran = state.start is None or index >= state.start
            out = cls.__call__(self, *args, **kwargs) if ran else state.replay[index]
            if state.recording:
                state.outputs[index] = out
                state.touched[index] = state.caches_in(args, kwargs) if ran else state.replay_touched.get(index, set())
            return out

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    return _SUBCLASSES[cls]


def _decoder_list(model, path: str):
    """(container path, index) of the shortest prefix of `path` that indexes a list."""
    for m in _INDEXED.finditer(path):
        prefix = path[: m.start()]
        node = model
        for part in prefix.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, list):
            return prefix, int(m.group(1))
    return None


def install(model, switch_paths: list[str]):
    """Make the decoder layers resumable; returns (state, decoder index per MoE layer) or None.

    None when the MoE layers do not sit in one list of layers (then a miss recomputes the
    whole step)."""
    found = [_decoder_list(model, p) for p in switch_paths]
    if not all(found) or len({f[0] for f in found}) != 1:
        return None
    container = model
    for part in found[0][0].split("."):
        container = container[part] if isinstance(container, dict) else getattr(container, part)
    state = ResumeState()
    for i, layer in enumerate(container):
        object.__setattr__(layer, "_chronos_resume", state)
        object.__setattr__(layer, "_chronos_index", i)
        if type(layer) not in _SUBCLASSES.values():
            layer.__class__ = _resumable(type(layer))
    return state, [f[1] for f in found]
