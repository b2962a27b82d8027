"""ExpertCache: a fixed budget of expert slots per MoE layer, filled from the shards.

Each layer owns, per projection parameter, one preallocated MLX array of shape
[slots, *per_expert_shape]. Experts are read with pread straight into a writable numpy
view of that array (on unified memory this is the very buffer the GPU reads), so a load
is one copy from the page cache or disk. The expert -> slot map is kept on the host (to
decide) and mirrored on the device (`table`) so that compute can remap router indices
without a host round trip.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .layout import ExpertTensor
from .policy import make_policy
from .shards import ShardReader

MX_DTYPES = {
    "U8": mx.uint8,
    "U32": mx.uint32,
    "I32": mx.int32,
    "F16": mx.float16,
    "BF16": mx.bfloat16,
    "F32": mx.float32,
}
_FLOAT = {mx.float16, mx.bfloat16, mx.float32}


def _bf16_to_f32(raw: np.ndarray, out: np.ndarray):
    out.view(np.uint32).reshape(-1)[:] = raw.view(np.uint16).astype(np.uint32) << 16


def _f16_to_f32(raw: np.ndarray, out: np.ndarray):
    out.reshape(-1)[:] = raw.view(np.float16)


_WIDENING = {("BF16", mx.float32): _bf16_to_f32, ("F16", mx.float32): _f16_to_f32}


def _numpy_view(arr: mx.array) -> np.ndarray:
    """A writable numpy view sharing `arr`'s buffer (bfloat16 is viewed as uint16)."""
    if arr.dtype == mx.bfloat16:
        arr = mx.view(arr, mx.uint16)
        mx.eval(arr)
    view = np.array(arr, copy=False)
    if not view.flags.writeable:  # pragma: no cover - MLX always exposes writable buffers today
        raise RuntimeError("MLX did not expose a writable buffer for the expert slots")
    return view


def _numpy_of(arr: mx.array) -> np.ndarray:
    if arr.dtype == mx.bfloat16:
        arr = mx.view(arr, mx.uint16)
    return np.array(arr)


@dataclass
class SlotParam:
    """Slots of one parameter of one layer, plus where each expert's bytes are on disk."""

    source: ExpertTensor
    dtype: mx.Dtype  # resident dtype (what compute sees)
    slots: mx.array = None
    view: np.ndarray = None

    @property
    def nbytes_per_expert(self) -> int:
        n = 1
        for d in self.source.shape:
            n *= d
        return n * self.dtype.size


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    load_s: float = 0.0
    speculative_loads: int = 0


@dataclass
class LayerSlots:
    """Slots, maps and counters of one MoE layer."""

    num_experts: int
    num_slots: int
    params: dict  # "gate_proj.weight" -> SlotParam
    policy: object
    slot_of: np.ndarray = None  # expert -> slot, -1 when absent
    expert_in: np.ndarray = None  # slot -> expert, -1 when free
    table: mx.array = None  # device copy of slot_of, absent mapped to 0
    identity: bool = False  # slot e holds expert e for every e: indices need no remap
    counters: LayerCounters = field(default_factory=LayerCounters)
    dirty: bool = True  # slot_of changed since `table` was built
    full: bool = False  # every expert of the layer is resident: no routing can miss

    def refresh(self):
        """Rebuild the device table after loads (on the thread that builds the graph)."""
        if self.dirty:
            self.dirty = False
            self.table = mx.array(np.maximum(self.slot_of, 0).astype(np.uint32))
            self.identity = self.num_slots == self.num_experts and bool(
                (self.slot_of == np.arange(self.num_experts)).all()
            )
            self.full = bool((self.slot_of >= 0).all())


    def resident(self, experts) -> np.ndarray:
        return self.slot_of[experts] >= 0


class ExpertCache:
    """The budgeted expert slots of every MoE layer of a model."""

    def __init__(self, layers: list[dict], num_slots: int, reader: ShardReader, policy: str = "lru"):
        """`layers[l]` maps parameter names ("gate_proj.weight") to (ExpertTensor, resident dtype)."""
        self.reader = reader
        self.layers: list[LayerSlots] = []
        self._lock = threading.RLock()
        for spec in layers:
            params = {}
            num_experts = None
            for pname, (source, dtype) in spec.items():
                num_experts = len(source.slices)
                p = SlotParam(source, dtype)
                p.slots = mx.zeros((num_slots, *source.shape), dtype=dtype)
                mx.eval(p.slots)
                p.view = _numpy_view(p.slots)
                params[pname] = p
            layer = LayerSlots(num_experts, num_slots, params, make_policy(policy, num_experts))
            layer.slot_of = np.full(num_experts, -1, dtype=np.int64)
            layer.expert_in = np.full(num_slots, -1, dtype=np.int64)
            self._sync_table(layer)
            self.layers.append(layer)

    # --- sizes ---------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.layers[0].num_slots if self.layers else 0

    @property
    def bytes_per_expert(self) -> int:
        """Resident bytes of one expert of one layer (all its projections)."""
        return sum(p.nbytes_per_expert for p in self.layers[0].params.values())

    @property
    def resident_bytes(self) -> int:
        return self.bytes_per_expert * self.num_slots * len(self.layers)

    # --- queries -------------------------------------------------------------------------
    def slots_for(self, layer: int, experts: np.ndarray) -> np.ndarray:
        return self.layers[layer].slot_of[experts]

    # --- loading -------------------------------------------------------------------------
    def ensure(self, layer: int, experts, protect=None) -> list:
        """Make `experts` of `layer` resident; returns the experts that had to be loaded.

        Victims are chosen by the layer's policy among experts not in `protect` (by default
        `experts` itself: what the current computation needs is never evicted for itself).
        The caller guarantees no queued computation still reads a slot being overwritten.
        """
        L = self.layers[layer]
        experts = np.unique(np.asarray(experts, dtype=np.int64))
        missing = experts[L.slot_of[experts] < 0]
        if len(missing) == 0:
            return []
        protect = set(experts.tolist()) if protect is None else set(protect) | set(experts.tolist())
        if len(protect) > L.num_slots:
            protect = set(experts.tolist())
        if len(experts) > L.num_slots:
            raise ValueError(f"layer {layer}: {len(experts)} experts requested, {L.num_slots} slots")
        with self._lock:
            t0 = time.perf_counter()
            for e in missing.tolist():
                free = np.flatnonzero(L.expert_in == -1)
                if len(free):
                    slot = int(free[0])
                else:
                    victim = L.policy.victim(protect)
                    slot = int(L.slot_of[victim])
                    L.slot_of[victim] = -1
                    L.policy.removed(victim)
                    L.counters.evictions += 1
                self._read_expert(L, e, slot)
                L.slot_of[e] = slot
                L.expert_in[slot] = e
                L.policy.added(e)
            L.counters.load_s += time.perf_counter() - t0
            self._sync_table(L)
        return missing.tolist()

    def _read_expert(self, L: LayerSlots, expert: int, slot: int):
        for p in L.params.values():
            src = p.source.slices[expert]
            target = p.view[slot]
            if MX_DTYPES.get(p.source.dtype) == p.dtype:
                self.reader.read_into(src.path, src.offset, target)
            elif (p.source.dtype, p.dtype) in _WIDENING:
                # Exact widening conversions are done in numpy, straight into the slot.
                raw = np.empty(src.nbytes, dtype=np.uint8)
                self.reader.read_into(src.path, src.offset, raw)
                _WIDENING[(p.source.dtype, p.dtype)](raw, target)
            else:
                # Narrowing: convert with MLX itself so rounding matches stock mlx_lm's.
                raw = np.empty(src.nbytes, dtype=np.uint8)
                self.reader.read_into(src.path, src.offset, raw)
                disk = MX_DTYPES[p.source.dtype]
                arr = mx.view(mx.array(raw), disk).reshape(p.source.shape).astype(p.dtype)
                target[...] = _numpy_of(arr)
            L.counters.bytes_read += src.nbytes

    def _sync_table(self, L: LayerSlots):
        L.dirty = True
        if threading.current_thread() is threading.main_thread():
            L.refresh()

    def prewarm(self, plan: dict, stop: threading.Event | None = None) -> int:
        """Load `plan[layer]` (experts, most wanted first) into free slots only, never evicting.

        Safe to run in a background thread while the model computes: a slot is reserved
        before it is written and mapped only once complete, so a computation either sees
        the expert fully loaded or not at all. Returns how many experts were loaded.
        """
        loaded = 0
        for layer, experts in plan.items():
            L = self.layers[layer]
            for e in experts:
                if stop is not None and stop.is_set():
                    return loaded
                with self._lock:
                    if L.slot_of[e] >= 0:
                        continue
                    free = np.flatnonzero(L.expert_in == -1)
                    if not len(free):
                        break
                    slot = int(free[0])
                    L.expert_in[slot] = -2  # reserved: ensure() will not pick it
                    self._read_expert(L, int(e), slot)
                    L.slot_of[e] = slot
                    L.expert_in[slot] = e
                    L.policy.added(int(e))
                    self._sync_table(L)
                    loaded += 1
        return loaded

    def fill_identity(self, layer: int):
        """Load every expert into the slot of the same number (budget covers all experts)."""
        L = self.layers[layer]
        assert L.num_slots == L.num_experts
        with self._lock:
            t0 = time.perf_counter()
            for e in range(L.num_experts):
                if L.slot_of[e] == e:
                    continue
                self._read_expert(L, e, e)
                L.slot_of[e] = e
                L.expert_in[e] = e
                L.policy.added(e)
            L.counters.load_s += time.perf_counter() - t0
            self._sync_table(L)
