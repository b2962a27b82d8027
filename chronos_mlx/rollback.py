"""Exact rollback of a model's caches after a decode step that must be discarded or redone.

An optimistic decode step may have run some MoE layer on a stand-in expert; it is then
redone, and the caches it advanced must first be put back exactly as they were. mlx_lm's
`trim` does that only for caches that merely append (KVCache, a RotatingKVCache that has
not wrapped yet, ...): a wrapped rotating window overwrites its oldest entry, a chunked
cache drops its front, and linear-attention / SSM caches (`ArraysCache`, model-specific
caches) replace their state every step. So before each step we take a `Checkpoint` of
every cache object, choosing per object and per step:

- trim: the cache only appends this step (`is_trimmable()` and an integer `offset`):
  remember the offset, and later trim what was added. Costs nothing.
- restore: anything else: keep the object's attributes (arrays by reference: MLX arrays
  are values, and a new handle does not see later in-place slice updates) and put them
  back. Costs an extra reference, which for a rotating window means its next update copies
  the (window-bounded) buffer instead of writing in place.

A cache object whose state cannot be captured this way (no `__dict__`) makes the step
non-speculative: the decode loop then routes it per layer, which never needs a rollback.
"""

from __future__ import annotations

import mlx.core as mx

# Attributes that trim() itself moves; any other scalar that changes during a step means
# the step did more than append (e.g. a chunked cache dropped its front).
_TRIM_MOVES = ("offset", "_idx")


def leaves(caches) -> list:
    """The cache objects that hold state: CacheList members are unpacked (recursively)."""
    out = []
    for c in caches:
        inner = getattr(c, "caches", None)
        if isinstance(inner, (list, tuple)) and inner is not caches:
            out += leaves(inner)
        elif c is not None:
            out.append(c)
    return out


def _copy(value):
    """A copy that later in-place updates of the cache cannot reach (arrays: a new handle)."""
    if isinstance(value, mx.array):
        return mx.array(value)
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


_SCALAR_NAMES: dict = {}  # cache type -> names of its scalar attributes (beyond _TRIM_MOVES)


def _scalars(cache) -> tuple:
    names = _SCALAR_NAMES.get(type(cache))
    if names is None:  # once per type: a step's checkpoint is on the decode path
        names = tuple(
            k for k, v in vars(cache).items() if isinstance(v, (int, float, bool, str)) and k not in _TRIM_MOVES
        )
        _SCALAR_NAMES[type(cache)] = names
    return tuple(getattr(cache, k, None) for k in names)


def _front_trim_due(cache) -> bool:
    """A chunked cache whose model drops the front of its chunk at the next step."""
    return (
        hasattr(cache, "maybe_trim_front")
        and getattr(cache, "keys", None) is not None
        and cache.offset - cache.start_position > cache.chunk_size
    )


def _appends_only(cache) -> bool:
    try:
        trimmable = bool(cache.is_trimmable())
    except Exception:
        return False
    return trimmable and type(getattr(cache, "offset", None)) is int and not _front_trim_due(cache)


def capturable(cache) -> bool:
    """Whether a checkpoint of this cache object can be taken at all."""
    return hasattr(cache, "__dict__")


class RollbackError(RuntimeError):
    """A cache changed in a way its checkpoint cannot undo (a bug, never a wrong token)."""


class CacheCheckpoint:
    """How to put one cache object back as it was when the checkpoint was taken."""

    __slots__ = ("cache", "offset", "scalars", "saved")

    def __init__(self, cache, restore_only: bool = False):
        self.cache = cache
        if not restore_only and _appends_only(cache):
            self.offset, self.scalars, self.saved = cache.offset, _scalars(cache), None
        else:
            self.offset, self.scalars, self.saved = None, None, _copy(vars(cache))

    def restore(self):
        c = self.cache
        if self.saved is not None:
            for k in [k for k in vars(c) if k not in self.saved]:
                delattr(c, k)
            for k, v in self.saved.items():
                setattr(c, k, _copy(v))  # a fresh handle: the checkpoint stays reusable
            return
        if _scalars(c) != self.scalars:
            raise RollbackError(f"{type(c).__name__} changed more than its offset during a step")
        n = c.offset - self.offset
        if n > 0:
            c.trim(n)


class Checkpoint:
    """Checkpoints of all cache objects of a prompt cache, taken before one decode step."""

    def __init__(self, prompt_cache, only=None):
        """`only`: ids of the cache objects to capture (by their attributes), else all."""
        self.entries = {
            id(c): CacheCheckpoint(c, restore_only=only is not None)
            for c in leaves(prompt_cache)
            if only is None or id(c) in only
        }

    def restore(self, keep=()):
        """Put every cache back, except the objects whose ids are in `keep`."""
        for key, entry in self.entries.items():
            if key not in keep:
                entry.restore()


def checkpointable(prompt_cache) -> bool:
    return all(capturable(c) for c in leaves(prompt_cache))
