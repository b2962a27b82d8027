"""ExpertCache: a fixed budget of expert slots per MoE layer, filled from the shards.

Each layer owns, per projection parameter, one preallocated MLX array of shape
[slots, *per_expert_shape]. Experts are read with pread straight into a writable numpy
view of that array (on unified memory this is the very buffer the GPU reads), so a load
is one copy from the page cache or disk. The expert -> slot map is kept on the host (to
decide) and mirrored on the device (`table`) so that compute can remap router indices
without a host round trip.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .layout import ExpertTensor
from .policy import make_policy
from .interrupts import LoadInterrupted, deferred_sigint
from .errors import ShardError
from .shards import ReadRun, ShardReader, _preadv_full, _skip, wait_until
from .upload import MAX_STAGING, device_upload, slot_address

MX_DTYPES = {
    "U8": mx.uint8,
    "U32": mx.uint32,
    "I32": mx.int32,
    "F16": mx.float16,
    "BF16": mx.bfloat16,
    "F32": mx.float32,
}
_FLOAT = {mx.float16, mx.bfloat16, mx.float32}


def _to_float32(raw: np.ndarray, disk: str) -> np.ndarray:
    if disk == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if disk == "F16":
        return raw.view(np.float16).astype(np.float32)
    return raw.view(np.float32)


def _round_to_bf16(f: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (what MLX's astype does)."""
    u = f.view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(f), np.uint32(0x7FC0), rounded).astype(np.uint16)


def convert_into(raw: np.ndarray, disk: str, dtype: mx.Dtype, out: np.ndarray):
    """Convert an expert's float bytes on disk to the resident dtype, in numpy (thread-safe).

    bf16/f16 -> f32 is exact; narrowing rounds to nearest even like MLX's astype, so the
    values match what stock mlx_lm computes with after `model.set_dtype`."""
    flat = out.reshape(-1)
    if dtype == mx.float32 and disk == "BF16":  # the common CPU case: one ufunc, no temporaries
        np.left_shift(raw.view(np.uint16), 16, out=flat.view(np.uint32), dtype=np.uint32)
        return
    f = _to_float32(raw, disk)
    if dtype == mx.float32:
        flat[:] = f
    elif dtype == mx.bfloat16:
        flat[:] = _round_to_bf16(f)
    elif dtype == mx.float16:
        flat[:] = f.astype(np.float16)
    else:
        raise ValueError(f"cannot convert {disk} experts to {dtype}")


def id_list(experts) -> list:
    """Expert ids as a list of Python ints (a list, set or tuple as is: a decode step's
    handful of ids would pay numpy's per-call cost for nothing)."""
    if isinstance(experts, (list, tuple, set, frozenset)):
        return [int(e) for e in experts]
    return np.asarray(experts, dtype=np.int64).reshape(-1).tolist()


def _numpy_view(arr: mx.array) -> np.ndarray:
    """A writable numpy view sharing `arr`'s buffer (bfloat16 is viewed as uint16)."""
    if arr.dtype == mx.bfloat16:
        arr = mx.view(arr, mx.uint16)
        mx.eval(arr)
    view = np.array(arr, copy=False)
    if not view.flags.writeable:  # pragma: no cover - MLX always exposes writable buffers today
        raise RuntimeError("MLX did not expose a writable buffer for the expert slots")
    return view


@dataclass
class SlotParam:
    """Slots of one parameter of one layer, plus where each expert's bytes are on disk."""

    source: ExpertTensor
    dtype: mx.Dtype  # resident dtype (what compute sees)
    slots: mx.array = None
    view: np.ndarray = None
    # The read plan, precomputed so that planning a batch costs little per expert: where
    # each expert's bytes are, whether expert e+1 follows e on disk, each slot as bytes.
    paths: list = None
    offsets: list = None
    followed: list = None
    convert: bool = False  # disk dtype differs from the resident one
    slot_bytes: list = None
    addr: int = 0  # slot 0's first byte (a device copy's destination; slots are contiguous)

    def plan(self):
        slices = self.source.slices
        self.paths = [sl.path for sl in slices]
        self.offsets = [sl.offset for sl in slices]
        self.followed = [
            a.path == b.path and a.offset + a.nbytes == b.offset for a, b in zip(slices, slices[1:])
        ] + [False]
        self.convert = MX_DTYPES.get(self.source.dtype) != self.dtype
        self.slot_bytes = [memoryview(self.view[s]).cast("B") for s in range(len(self.view))]
        self.addr = slot_address(self.view)

    def bf16_high_halves(self):
        """The slots' upper 16 bits of each float32 [slots, n] when this parameter is bf16 on
        disk and float32 in the slots (the common CPU case), else None. A float32 made from a
        bf16 is that bf16 in its upper half and zeros below, and every value these slots ever
        hold is one: writing the bf16 there converts it (one strided copy per batch)."""
        found = self.__dict__.get("_bf16_high", False)
        if found is False:
            found = None
            if self.source.dtype == "BF16" and self.dtype == mx.float32 and sys.byteorder == "little":
                found = self.view.view(np.uint16).reshape(len(self.view), -1)[:, 1::2]
            self._bf16_high = found
        return found

    @property
    def nbytes_per_expert(self) -> int:
        n = 1
        for d in self.source.shape:
            n *= d
        return n * self.dtype.size


def _finish_short(fd: int, offset: int, views: list, got: int, paths):
    """Complete a short `preadv` (a signal, a network file system); the end of the file
    before the bytes the header lists is a ShardError."""
    _preadv_full(fd, offset + got, _skip(views, got), paths[0] if len(paths) == 1 else paths)


@dataclass
class _TensorReads:
    """How `_read_small` reads one parameter of a layer: each expert's file and offset,
    each slot's bytes, and (bf16 on disk, float32 slots) where the converted values go."""

    paths: list
    fds: list  # per expert
    offsets: list  # per expert
    nbytes: int
    rows: list  # per slot: its bytes
    high: np.ndarray | None  # per slot: the upper halves of its float32s (bf16_high_halves)
    followed: list = None  # per expert: the next expert's bytes follow it in the same file
    addr: int = 0  # slot 0's first byte, for device copies (slot s at addr + s * nbytes)
    stage: np.ndarray = None  # [capacity, nbytes] the main thread's staging rows for converted reads
    stage_rows: list = None
    stage_halves: np.ndarray = None

    def runs(self, experts: list) -> list:
        """(i, j): experts[i:j] lie back to back on disk (sorted ids)."""
        out, i = [], 0
        for j in range(1, len(experts) + 1):
            if j == len(experts) or experts[j] != experts[j - 1] + 1 or not self.followed[experts[j - 1]]:
                out.append((i, j))
                i = j
        return out

    def staging(self, k: int):
        """([k] staging rows, the same as uint16 [k, n/2]) for converted reads. The main
        thread reuses one buffer; other threads (prefetch reads of the same layer may run
        beside a demand load) get their own."""
        if threading.current_thread() is not threading.main_thread():
            stage = np.empty((k, self.nbytes), dtype=np.uint8)
            return [memoryview(r) for r in stage], stage.view(np.uint16)
        if self.stage is None or len(self.stage) < k:
            self.stage = np.empty((max(k, 8), self.nbytes), dtype=np.uint8)
            self.stage_rows = [memoryview(r) for r in self.stage]
            self.stage_halves = self.stage.view(np.uint16)
        return self.stage_rows, self.stage_halves


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    load_s: float = 0.0
    prefetch_hits: int = 0
    prefetch_wasted_bytes: int = 0
    prefetch_cancelled: int = 0


@dataclass
class LayerSlots:
    """Slots, maps and counters of one MoE layer."""

    num_experts: int
    num_slots: int
    params: dict  # "gate_proj.weight" -> SlotParam
    policy: object
    slot_of: np.ndarray = None  # expert -> slot, -1 when absent
    expert_in: np.ndarray = None  # slot -> expert, -1 when free
    _table: mx.array = None  # device copy of `table_map` (absent mapped to 0), built when first used
    identity: bool = False  # slot e holds expert e for every e: indices need no remap
    counters: LayerCounters = field(default_factory=LayerCounters)
    dirty: bool = True  # slot_of changed since `table` was built
    full: bool = False  # every expert of the layer is resident: no routing can miss
    pending: dict = field(default_factory=dict)  # expert -> (slot, Future, is_prefetch)
    prefetched: set = field(default_factory=set)  # loaded by a prediction, not used yet
    last_used: set = field(default_factory=set)
    table_map: np.ndarray = None  # slot_of as of the last refresh
    lock: object = None  # the cache's lock
    # Per-layer routing's expert->slot map: one device array rewritten in place by the host
    # (`write_gate_table`) before any computation that reads it is started.
    gate_table: mx.array = None
    gate_view: np.ndarray = None
    files: list = field(default_factory=list)  # the shards its experts are in
    gate_stale: bool = True  # slot_of changed since the gate table was written
    wait_stale: bool = True  # slot_of changed since the device-wait table was written (device_wait.py)
    read_plan: list = None  # _TensorReads per parameter (built at the first small read)
    # `_read_small` converts only bf16 on disk to float32 slots (the upper halves); any
    # other conversion (float16 on disk read at float32, ...) takes `_read_experts`.
    lean: bool = True
    index: int = 0  # its place in ExpertCache.layers

    def refresh(self):
        """Take a new snapshot of the expert->slot map after loads (on the thread that builds
        the graph); the device table is made from it when first used.

        `table_map` is the host copy the table is built from, taken under the cache lock:
        background loads may change `slot_of` at any time, the table only changes here.
        Gated per-layer routing never uses this table (it has its own, written in place), so
        it is not built for every layer that loaded."""
        if self.dirty:
            with self.lock:
                self.dirty = False
                snap = self.slot_of.copy()
            self.table_map = snap
            self._table = None
            if self.num_slots < self.num_experts:  # the common case under a budget: no numpy
                self.identity = self.full = False
                return
            self.identity = bool((snap == np.arange(self.num_experts)).all())
            self.full = bool((snap >= 0).all())

    @property
    def table(self) -> mx.array:
        if self._table is None:
            self._table = mx.array(np.maximum(self.table_map, 0).astype(np.uint32))
        return self._table

    def resident(self, experts) -> np.ndarray:
        return self.slot_of[experts] >= 0


_UNSET = object()  # no per-thread choice of upload (ExpertCache.uploading_with)


class _ReadPlan:
    """One layer's share of a reader submission: its experts' byte ranges (runs) and where
    they land (the slots, float conversion rows, or device staging)."""

    def __init__(self, L: "LayerSlots", items: list):
        self.L = L
        k = len(items)
        self.order = sorted(range(k), key=lambda i: items[i][0])
        self.experts = [items[i][0] for i in self.order]
        self.slots = [items[i][1] for i in self.order]
        self.runs, self.spans, self.converts, self.param_bufs, self.done = [], [], [], [], []

    def build(self, up, staged, pos: int, copies: list) -> int:
        """Plan the reads; device copies (from `staged` at `pos` on) go to `copies`.
        Returns the staging position after this layer's bytes."""
        experts, slots, k = self.experts, self.slots, len(self.experts)
        for p in self.L.params.values():
            n = p.source.nbytes
            if p.convert:
                raw = np.empty(k * n, dtype=np.uint8)
                mv = memoryview(raw)
                bufs = [mv[i * n : (i + 1) * n] for i in range(k)]
                self.converts.append((raw, p))
            elif up is not None:  # the copy engine writes the slots once all is read
                bufs = [staged[pos + i * n : pos + (i + 1) * n] for i in range(k)]
                copies += [(p.addr, p.addr + s * n, pos + i * n, n) for i, s in enumerate(slots)]
                pos += k * n
            else:
                bufs = [p.slot_bytes[s] for s in slots]
            self.param_bufs.append((p, bufs))
            f = p.followed
            bounds = [0] + [i for i in range(1, k) if not (experts[i] == experts[i - 1] + 1 and f[experts[i - 1]])] + [k]
            for a, b in zip(bounds[:-1], bounds[1:]):
                self.runs.append(ReadRun(p.paths[experts[a]], p.offsets[experts[a]], bufs[a:b], (b - a) * n))
                self.spans.append((a, b))
        return pos

    def verify(self, verifier, layer: int):
        from .verify import expert_tag

        tags = [expert_tag(p.source) for p, _ in self.param_bufs]
        for i, e in enumerate(self.experts):
            verifier.check(layer, e, [(p.paths[e], p.offsets[e], bufs[i], tag) for (p, bufs), tag in zip(self.param_bufs, tags)])

    def finish(self) -> list:
        """Convert what needs it into the slots; per item (caller's order) its arrival time."""
        for raw, p in self.converts:
            out = np.empty((len(self.slots), *p.source.shape), dtype=p.view.dtype)
            convert_into(raw, p.source.dtype, p.dtype, out)
            p.view[self.slots] = out
        ready = [0.0] * len(self.order)
        for (a, b), t in zip(self.spans, self.done):
            for pos in range(a, b):
                ready[self.order[pos]] = max(ready[self.order[pos]], t)
        return ready


class ExpertCache:
    """The budgeted expert slots of every MoE layer of a model."""

    def __init__(self, layers: list[dict], num_slots: int, reader: ShardReader, policy: str = "lru", pool=None):
        """`layers[l]` maps parameter names ("gate_proj.weight") to (ExpertTensor, resident dtype).

        `pool` (io.IOPool) runs reads on background threads; without one reads are inline."""
        self.reader = reader
        self.pool = pool
        # Without a pool, prefetches the main thread claims may wait here until the device
        # has been given work (`run_deferred`): read at once, they would delay its launch.
        self.defer_prefetch = False
        self.deferred: list = []  # [(LayerSlots, batch)] claimed, not yet read
        self.verifier = None  # verify.ExpertVerifier (--verify-experts): checks each expert's first read
        # On CUDA reads land in page-locked staging and the copy engine writes the slots
        # (upload.py); elsewhere (Apple silicon, CPU) straight into the slots. None: the latter.
        self._local = threading.local()
        self.upload = device_upload()
        self.copy_engine_paused = False  # set while device-wait routing decodes (device_wait.py)
        # Besides the main thread, the one thread that decides about slots while it is set
        # (device-wait's service thread while steps run: then no other thread loads or
        # prefetches): its demand loads take the lean path (`_ensure_now`) too.
        self.deciding_thread = None
        # Guessed experts read ahead into staging (preread.py, device-wait with guesses):
        # a load of one lists its copies from there instead of reading it.
        self.prereader = None
        self.upload_error = None  # why device copies stopped, if the driver refused them
        self._queue_on = None  # thread whose copies wait at the end of `one_copy_wait`
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
                p.plan()
                params[pname] = p
            layer = LayerSlots(num_experts, num_slots, params, make_policy(policy, num_experts))
            layer.lean = all(not p.convert or p.bf16_high_halves() is not None for p in params.values())
            layer.index = len(self.layers)
            layer.lock = self._lock
            layer.files = sorted({sl.path for p in params.values() for sl in p.source.slices})
            layer.slot_of = np.full(num_experts, -1, dtype=np.int64)
            layer.expert_in = np.full(num_slots, -1, dtype=np.int64)
            layer.gate_table = mx.zeros((num_experts,), dtype=mx.uint32)
            mx.eval(layer.gate_table)
            layer.gate_view = _numpy_view(layer.gate_table)
            self._sync_table(layer)
            self.layers.append(layer)

    # --- sizes ---------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.layers[0].num_slots if self.layers else 0

    @property
    def bytes_per_expert(self) -> int:
        """Resident bytes of one expert of one layer (all its projections)."""
        found = self.__dict__.get("_resident_bytes")
        if found is None:  # read for every wasted prefetch evicted
            found = self._resident_bytes = sum(p.nbytes_per_expert for p in self.layers[0].params.values())
        return found

    @property
    def bytes_on_disk_per_expert(self) -> int:
        found = self.__dict__.get("_disk_bytes")
        if found is None:  # read for every expert loaded
            found = self._disk_bytes = sum(p.source.nbytes for p in self.layers[0].params.values())
        return found

    @property
    def resident_bytes(self) -> int:
        return self.bytes_per_expert * self.num_slots * len(self.layers)

    # --- queries -------------------------------------------------------------------------
    def slots_for(self, layer: int, experts: np.ndarray) -> np.ndarray:
        return self.layers[layer].slot_of[experts]

    # --- loading -------------------------------------------------------------------------
    # Slot states: expert_in[slot] = expert id (resident), -1 (free) or -2 (being written).
    # An expert is mapped (slot_of >= 0) only once its bytes are complete, so a computation
    # built from the table can never read a half-written slot.

    def _take_slot(self, L: LayerSlots, protect: set):
        """A free slot, or the slot of the policy's victim (evicted now); None if every
        resident expert is protected. Lock held."""
        got = self._take_slots(L, 1, protect)
        return got[0] if got else None

    def _take_slots(self, L: LayerSlots, n: int, protect: set) -> list:
        """Up to `n` slots: free ones first, then those of the policy's victims (evicted now,
        ranked once for all of them). Lock held; the caller marks them reserved."""
        # Python over a list: at most a few hundred slots, and this runs at every demand
        # load right after the device computed, where each numpy call's first touch is dear.
        slots = [i for i, e in enumerate(L.expert_in.tolist()) if e == -1][:n]
        if len(slots) < n:
            for victim in L.policy.victims(n - len(slots), protect):
                slot = int(L.slot_of[victim])
                L.slot_of[victim] = -1
                L.policy.removed(victim)
                L.counters.evictions += 1
                if victim in L.prefetched:  # brought in by a prediction that never came true
                    L.prefetched.discard(victim)
                    L.counters.prefetch_wasted_bytes += self.bytes_per_expert
                L.dirty = L.gate_stale = L.wait_stale = True
                slots.append(slot)
        return slots

    def _cancel_a_prefetch(self, L: LayerSlots, keep: set):
        """Take back the slot of a prefetch that has not started and is not wanted. Lock held."""
        for e, (slot, fut, is_prefetch) in list(L.pending.items()):
            if is_prefetch and e not in keep and fut.cancel():
                L.pending.pop(e)
                L.counters.prefetch_cancelled += 1
                return slot
        return None

    def _reserve(self, L: LayerSlots, items: list, prefetch: bool) -> list:
        """Mark `items` [(expert, slot)] as being loaded; returns the batch to run. Lock held."""
        batch = []
        for e, slot in items:
            L.expert_in[slot] = -2
            fut = Future()
            L.pending[e] = (slot, fut, prefetch)
            batch.append((e, slot, fut))
        return batch

    def _run_batch(self, L: LayerSlots, batch: list, prefetch: bool, wait: bool = True, checked: bool = False) -> float:
        """Read a batch of experts into their reserved slots (any thread, lock not held).

        All their byte ranges go to the reader as one submission. Off the main thread each
        expert is mapped, and its future resolved, as soon as its own bytes have arrived
        (per-expert readiness for prefetches). On the main thread (demand loads, where the
        caller waits for the whole batch anyway) the batch is mapped as one step right
        after the read, inside a section Ctrl-C cannot cut (`deferred_sigint`), and only the
        wait for the (simulated) arrival is interruptible: returns that time; with
        `wait=False` the caller waits for it. Experts whose load was cancelled meanwhile
        are skipped (the canceller took their slot back).

        Whatever happens (an I/O error, a changed shard, a KeyboardInterrupt), every future
        of the batch is resolved and every slot it reserved ends up mapped to its expert or
        free again: no slot stays claimed, nobody waits forever. `checked`: the caller has just
        checked the layer's shards are unchanged (one `stat` each, not two)."""
        main = threading.current_thread() is threading.main_thread()
        with deferred_sigint():
            live = []
            try:
                for item in batch:
                    if item[2].set_running_or_notify_cancel():
                        live.append(item)
                if not live:
                    return 0.0
                ready = self._read_experts(L, [(e, slot) for e, slot, _ in live], checked)
            except BaseException as exc:
                self._abandon(L, batch, exc)
                if isinstance(exc, Exception):
                    return 0.0  # the waiters see it through their futures
                raise  # KeyboardInterrupt, SystemExit: for this thread too
            if main:
                try:
                    for e, slot, fut in live:
                        self._map(L, e, slot, prefetch)
                        fut.set_result(None)
                finally:
                    self._finish(L, live, prefetch)
        if main:
            deadline = max(ready)
            if wait:
                wait_until(deadline)
            return deadline
        mapped = 0
        try:
            for t, (e, slot, fut) in sorted(zip(ready, live), key=lambda r: r[0]):
                wait_until(t)
                self._map(L, e, slot, prefetch)
                mapped += 1
                fut.set_result(None)
        finally:
            if mapped < len(live):  # an exception while waiting: the bytes are all in (reads are synchronous)
                self._finish(L, live, prefetch)
        return max(ready)

    def _finish(self, L: LayerSlots, live: list, prefetch: bool):
        """After an exception in the middle of mapping a read batch: map what is not mapped
        yet (its bytes are complete) and resolve every future; an item that cannot be
        mapped gives its slot back."""
        for e, slot, fut in live:
            if fut.done():
                continue
            try:
                if L.expert_in[slot] != e:
                    self._map(L, e, slot, prefetch)
                fut.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - nothing may stay claimed
                self._abandon(L, [(e, slot, fut)], exc)

    def _map(self, L: LayerSlots, e: int, slot: int, prefetch: bool):
        """Expert `e`'s bytes are complete in `slot`: make it resident."""
        with self._lock:
            L.counters.bytes_read += self.bytes_on_disk_per_expert
            L.slot_of[e] = slot
            L.expert_in[slot] = e
            L.policy.added(e)
            L.pending.pop(e, None)
            if prefetch:
                L.prefetched.add(e)
            L.dirty = L.gate_stale = L.wait_stale = True

    def _abandon(self, L: LayerSlots, batch: list, exc: BaseException):
        """Give back the slots of a batch whose loads will not complete, resolve its futures."""
        with self._lock:
            for e, slot, fut in batch:
                if fut.done():
                    continue
                if L.pending.get(e, (None, fut))[1] is fut:
                    L.pending.pop(e, None)
                if L.expert_in[slot] == -2:
                    L.expert_in[slot] = -1
        if not isinstance(exc, Exception):  # waiters on other threads must not get a KeyboardInterrupt
            exc = LoadInterrupted(f"expert load interrupted ({type(exc).__name__})")
        for e, slot, fut in batch:
            if not fut.done():
                if not fut.cancel():  # running: resolve it with the error
                    try:
                        fut.set_exception(exc)
                    except Exception:  # resolved meanwhile (InvalidStateError)
                        pass

    def _release_demand(self, L: LayerSlots, demand: list, exc: BaseException):
        """Undo the reservations of an `ensure` that failed before its batch ran."""
        with self._lock:
            reserved = [(e, slot, L.pending[e][1]) for e, slot in demand if e in L.pending and L.pending[e][0] == slot]
            for e, slot in demand:
                if e not in L.pending and L.expert_in[slot] == -2:
                    L.expert_in[slot] = -1
        self._abandon(L, reserved, exc)

    def ensure(self, layer: int, experts, protect=None, retries: int = 0, prefetch: bool = False) -> list:
        """Make `experts` of `layer` resident and wait for them; returns those it loaded.

        Experts already being prefetched are waited for, not read twice. Victims are chosen
        by the layer's policy, never among `experts` (nor `protect`). The caller guarantees
        no queued computation still reads the slot of an expert that may be evicted.
        `prefetch`: the loads are guesses (counted as prefetches: a hit when used, wasted
        bytes when evicted unused), read now all the same (device_wait's service thread).
        """
        L = self.layers[layer]
        if self.deferred and threading.current_thread() is threading.main_thread():
            self.run_deferred()  # nothing is left waiting on a read no one will start
        # Python sets and lists: a decode step asks for a handful of experts per layer, and
        # numpy's per-call cost is what that would pay (this runs for every MoE layer).
        experts = sorted(set(id_list(experts)))
        if len(experts) > L.num_slots:
            raise ValueError(f"layer {layer}: {len(experts)} experts requested, {L.num_slots} slots")
        slot_of = L.slot_of
        if all(slot_of[e] >= 0 for e in experts):
            return []
        keep = set(experts)
        if protect is not None and len(keep | set(protect)) <= L.num_slots:
            keep |= set(protect)
        if not retries and not prefetch and (threading.current_thread() is threading.main_thread()
                                              or threading.get_ident() == self.deciding_thread):
            loaded = self._ensure_now(L, experts, keep)
            if loaded is not None:
                return loaded
        futures, loaded, blocked, running, demand = [], [], set(), [], []
        t0 = time.perf_counter()
        # Reservation and the batch's read and mapping are one section Ctrl-C cannot cut;
        # only the wait for the (simulated) drive below is interruptible.
        with deferred_sigint():
            try:
                with self._lock:
                    self._check_files(L)
                    for e in experts:
                        if L.slot_of[e] >= 0:
                            continue
                        if e in L.pending:
                            slot, fut, _ = L.pending[e]
                            if not fut.cancel():
                                futures.append(fut)  # in flight: wait for it
                                continue
                            L.pending.pop(e)
                            L.expert_in[slot] = -1
                        slot = self._take_slot(L, keep) if e not in blocked else None
                        if slot is None:
                            slot = self._cancel_a_prefetch(L, keep)
                        if slot is None:  # every free-able slot is being filled by a prefetch
                            blocked.add(e)
                            continue
                        L.expert_in[slot] = -2  # reserved: the next _take_slot must not hand it out
                        loaded.append(e)
                        demand.append((e, slot))
                    batch = self._reserve(L, demand, prefetch=prefetch)
                    futures += [fut for *_, fut in batch]
                    # Every read that holds a slot: prefetches and another thread's loads
                    # (a profile's pre-warm reserves free slots without being a prefetch).
                    running = [f for _, f, _ in L.pending.values()] if blocked else []
            except BaseException as exc:  # nothing reserved here may stay claimed
                self._release_demand(L, demand, exc)
                raise
            # Demand reads run here: the caller waits for them anyway, and a hand-off to a
            # reader thread costs more than the copy. The batch's reads are in flight together.
            deadline = self._run_batch(L, batch, prefetch=prefetch, wait=False, checked=True)
        wait_until(deadline)
        for fut in futures:
            fut.result()
        if blocked:
            # Reads in flight hold the remaining slots: let them land (they become
            # evictable), then place what is still missing.
            for fut in running:
                try:
                    fut.result()
                except Exception:
                    pass
            if retries > L.num_slots:
                raise RuntimeError(f"layer {layer}: no slot can be freed for experts {sorted(blocked)}")
            return loaded + self.ensure(layer, experts, protect, retries=retries + 1, prefetch=prefetch)
        L.counters.load_s += time.perf_counter() - t0
        if threading.current_thread() is threading.main_thread():
            L.refresh()
        return loaded

    def _ensure_now(self, L: LayerSlots, experts: list, keep: set):
        """`ensure`'s common case, lean (it runs for most MoE layers of a decode step under
        misses): on the main thread (or the `deciding_thread`), no wanted expert in flight,
        a slot for each. Returns None (nothing done) when that is not the case, for the
        general path.

        Slots are reserved and the experts mapped under the lock, so background prefetches
        of other layers never see a half-written slot; no futures are needed because no
        other thread decides about this layer meanwhile (prefetch decisions are taken on
        the main thread, prefetch.plan)."""
        t0 = time.perf_counter()
        with deferred_sigint():
            with self._lock:
                want = [e for e in experts if L.slot_of[e] < 0]
                if any(e in L.pending for e in want):
                    return None
                self._check_files(L)
                slots = self._take_slots(L, len(want), keep)
                for slot in slots:
                    L.expert_in[slot] = -2
                if len(slots) < len(want):  # prefetches hold the rest: the general path waits for them
                    for slot in slots:
                        L.expert_in[slot] = -1
                    return None
                items = list(zip(want, slots))
            try:
                ready = self._read_experts(L, items, checked=True)
            except BaseException:
                with self._lock:
                    for _, slot in items:
                        L.expert_in[slot] = -1
                raise
            mapped = 0
            try:
                for e, slot in items:
                    self._map(L, e, slot, False)
                    mapped += 1
            finally:  # the bytes are all in: whatever interrupted, map the rest
                for e, slot in items[mapped:]:
                    if L.slot_of[e] != slot:
                        self._map(L, e, slot, False)
        wait_until(max(ready, default=0.0))
        L.counters.load_s += time.perf_counter() - t0
        return want

    def ensure_layers(self, wanted: dict) -> dict:
        """`ensure` for several layers at once, the caller waiting: {layer: experts} ->
        {layer: experts it loaded}. A recovery after a failed optimistic step reloads every
        layer that missed; read layer by layer, each layer's few megabytes leave most reader
        threads idle and pay a drive's latency per layer, read together they are one
        submission that the reader shares out (`ShardReader.read_runs`). Victims per layer as
        in `ensure`. A layer whose experts a prefetch is reading (or whose free-able slots
        prefetches hold) takes `ensure`'s general path afterwards."""
        main = threading.current_thread() is threading.main_thread()
        if not main:
            return {layer: self.ensure(layer, experts) for layer, experts in wanted.items()}
        if self.deferred:
            self.run_deferred()
        loaded, batches, general = {}, [], []
        t0 = time.perf_counter()
        with deferred_sigint():
            try:
                with self._lock:
                    for layer, experts in wanted.items():
                        L = self.layers[layer]
                        experts = sorted(set(id_list(experts)))
                        if len(experts) > L.num_slots:
                            raise ValueError(f"layer {layer}: {len(experts)} experts requested, {L.num_slots} slots")
                        want = [e for e in experts if L.slot_of[e] < 0]
                        loaded[layer] = want
                        if not want:
                            continue
                        if any(e in L.pending for e in want):
                            general.append((layer, experts))
                            continue
                        self._check_files(L)
                        slots = self._take_slots(L, len(want), set(experts))
                        for slot in slots:
                            L.expert_in[slot] = -2
                        if len(slots) < len(want):  # prefetches hold the rest
                            for slot in slots:
                                L.expert_in[slot] = -1
                            general.append((layer, experts))
                            continue
                        batches.append((L, list(zip(want, slots))))
                ready = self._read_many(batches)
            except BaseException:
                with self._lock:  # nothing reserved here stays claimed
                    for L, items in batches:
                        for e, slot in items:
                            if L.slot_of[e] != slot:
                                L.expert_in[slot] = -1
                raise
            for L, items in batches:  # every byte is in: map them all
                for e, slot in items:
                    self._map(L, e, slot, False)
        wait_until(max((t for r in ready for t in r), default=0.0))
        if batches:
            share = (time.perf_counter() - t0) / len(batches)
            for L, _ in batches:
                L.counters.load_s += share
                L.refresh()
        for layer, experts in general:
            loaded[layer] = self.ensure(layer, experts)
        return loaded

    def _read_many(self, batches: list) -> list:
        """Read [(layer slots, items)] of several layers: one reader submission (on CUDA one
        per piece that fits the thread's staging). Small totals that one thread reads best
        go layer by layer through the lean path. Returns per batch its arrival times."""
        k = sum(len(items) for _, items in batches)
        if not k:
            return [[] for _ in batches]
        files = sorted({f for L, _ in batches for f in L.files})
        if len(batches) == 1 or (
            self.verifier is None
            and all(L.lean for L, _ in batches)
            and self.reader.plain_reads(k * self.bytes_on_disk_per_expert, files)
        ):
            return [self._read_experts(L, items, checked=True) for L, items in batches]
        per = max(1, MAX_STAGING // self.bytes_on_disk_per_expert) if self.upload is not None else k
        out = [[0.0] * len(items) for _, items in batches]
        flat = [(b, i) for b, (_, items) in enumerate(batches) for i in range(len(items))]
        for at in range(0, k, per):  # pieces of at most `per` experts, cut across layers
            chunk = flat[at : at + per]
            groups: dict = {}
            for b, i in chunk:
                groups.setdefault(b, []).append(i)
            order = list(groups)
            got = self._read_planned([(batches[b][0], [batches[b][1][i] for i in groups[b]]) for b in order])
            for b, times in zip(order, got):
                for i, t in zip(groups[b], times):
                    out[b][i] = t
        return out

    def prefetch(self, layer: int, experts, limit: int, protect=()) -> int:
        """Start background loads of up to `limit` of `experts` (most wanted first).

        Earlier prefetches of this layer not yet started and no longer wanted are
        cancelled. Victims never include `experts` themselves nor `protect` (say, what the
        layer used last). Only call it for layers no queued computation is reading.
        """
        L = self.layers[layer]
        wanted = [int(e) for e in experts]
        keep = set(wanted) | set(protect)
        # Claiming slots, registering their loads and starting them is one section Ctrl-C
        # cannot cut (a Ctrl-C held until its end must not find loads registered but never
        # started); only the wait for a simulated drive is outside it.
        deadline = 0.0
        with deferred_sigint():
            with self._lock:
                batch = self._claim_for_prefetch(L, wanted, keep, limit)
            if batch:
                if self.pool is not None:
                    self.pool.submit(self._run_batch, L, batch, True)
                elif self.defer_prefetch and threading.current_thread() is threading.main_thread():
                    self.deferred.append((L, batch))
                else:
                    deadline = self._run_batch(L, batch, prefetch=True, wait=False)
        wait_until(deadline)
        return len(batch)

    def run_deferred(self):
        """Read the prefetches `prefetch` deferred, on this (the main) thread. Called right
        after the device was given work, so the reads overlap its compute without a reader
        thread (no hand-off, no second thread taking the GIL from the one building graphs).
        A demand load that wants an expert still deferred takes its slot back (`ensure`
        cancels loads not started); such items are skipped here."""
        while self.deferred:
            L, batch = self.deferred.pop(0)
            self._run_batch(L, batch, prefetch=True)

    def _claim_for_prefetch(self, L: LayerSlots, wanted: list, keep: set, limit: int) -> list:
        """Cancel unwanted prefetches not started, claim slots for up to `limit` of `wanted`
        and register their loads. Lock held."""
        for e, (slot, fut, is_prefetch) in list(L.pending.items()):
            if is_prefetch and e not in keep and fut.cancel():
                L.pending.pop(e)
                L.expert_in[slot] = -1
                L.counters.prefetch_cancelled += 1
        want, slot_of, pending = [], L.slot_of, L.pending
        for e in wanted:
            if len(want) >= limit:
                break
            if slot_of[e] < 0 and e not in pending:
                want.append(e)
        # Victims ranked once for the whole batch (this runs at every layer's host read
        # when a predictor is on: per-slot ranking cost ~0.25 ms a layer on the demo).
        slots = self._take_slots(L, len(want), keep) if want else []
        items = list(zip(want, slots))
        for _, slot in items:
            L.expert_in[slot] = -2
        return self._reserve(L, items, prefetch=True)

    def write_gate_table(self, layer: int):
        """Point the layer's gate table at where its experts are now (absent: slot 0).
        Only while nothing queued reads the table."""
        L = self.layers[layer]
        if not L.gate_stale:
            return
        with self._lock:
            L.gate_stale = False
            self._write_table(L.gate_view, np.maximum(L.slot_of, 0))

    def write_wait_table(self, layer: int, view: np.ndarray, force: bool = False):
        """Write a device-wait table (device_wait.py): the slot of each resident expert,
        ABSENT (0xFFFFFFFF) for the others. Only while nothing queued reads it."""
        L = self.layers[layer]
        if not (L.wait_stale or force):
            return
        with self._lock:
            L.wait_stale = False
            self._write_table(view, L.slot_of)  # -1 wraps to 0xFFFFFFFF

    def _write_table(self, view: np.ndarray, values: np.ndarray):
        """`view[:] = values` (cast to the table's dtype) in a device table. Lock held."""
        up = self.upload
        if up is None:
            view[:] = values.astype(view.dtype)
            return
        # CUDA: a host write would pull the table's page over to the host and the next
        # layer's kernel would fault it back, every token; the copy engine writes it.
        # Its own staging: expert copies still queued may be reading the thread's other one.
        n = view.nbytes
        try:
            staged = up.table_staging(n)
        except OSError as e:  # no page-locked memory to be had: host writes from now on
            self.upload, self.upload_error = None, str(e)
            view[:] = values.astype(view.dtype)
            return
        staged[:n].view(view.dtype)[:] = values.astype(view.dtype)
        addr = slot_address(view)
        self._copy_to_device(up, [(addr, addr, 0, n)], source=staged)

    @property
    def upload(self):
        """What writes slots and tables from page-locked staging: the CUDA copy engine
        (upload.py), or None (host writes; also while `copy_engine_paused`), or what this
        thread set with `uploading_with`."""
        mine = getattr(self._local, "upload", _UNSET)
        if mine is not _UNSET:
            return mine
        return None if self.copy_engine_paused else self._upload

    @upload.setter
    def upload(self, value):
        self._upload = value

    @contextmanager
    def uploading_with(self, upload):
        """Slots this thread writes inside go through `upload` (None: written by the host).
        Device-wait routing needs it: on CUDA a copy-engine copy into managed memory waits
        for the kernels running on the device, and one of them may be waiting for it
        (measured on an H200: they wait for each other forever); its loads are host writes
        or copies the waiting kernel makes itself (device_wait.DevicePull)."""
        before = getattr(self._local, "upload", _UNSET)
        self._local.upload = upload
        try:
            yield
        finally:
            self._local.upload = before

    def wait_for_loads(self):
        """Until no load is in flight or deferred (prefetches included): afterwards only
        the caller changes slots."""
        if self.deferred and threading.current_thread() is threading.main_thread():
            self.run_deferred()
        while True:
            with self._lock:
                futures = [fut for L in self.layers for _, fut, _ in L.pending.values()]
            if not futures:
                return
            for fut in futures:
                try:
                    fut.result()
                except Exception:  # a failed prefetch leaves its slot free; nothing to wait for
                    pass

    def resident_layers(self) -> frozenset:
        """MoE layers that hold every expert now in a slot of their own (the layer has one for
        each): nothing they route can miss, and nothing can evict from them."""
        for L in self.layers:
            L.refresh()
        return frozenset(i for i, L in enumerate(self.layers) if L.full)

    def forget_layer(self, layer: int):
        """Unmap every expert of `layer` (no load of it may be in flight): what its slots hold
        is no longer trusted (device_wait: a pulled load that never reached them)."""
        L = self.layers[layer]
        with self._lock:
            for e in np.flatnonzero(L.slot_of >= 0).tolist():
                L.expert_in[L.slot_of[e]] = -1
                L.slot_of[e] = -1
                L.policy.removed(e)
            L.prefetched.clear()
            L.dirty = L.gate_stale = L.wait_stale = True
            L.full = L.identity = False

    def mark_used(self, layer: int, experts):
        """Experts a computation used: prefetch hits are counted, the policy informed."""
        L = self.layers[layer]
        used = experts if isinstance(experts, set) else set(int(e) for e in experts)
        with self._lock:
            hit = used & L.prefetched
            L.counters.prefetch_hits += len(hit)
            L.prefetched -= hit
            L.last_used = used
            L.policy.touch(used)

    def _check_files(self, L: LayerSlots):
        for path in L.files:
            self.reader.check(path)

    def _read_experts(self, L: LayerSlots, items: list, checked: bool = False) -> list[float]:
        """Read experts [(expert, slot)] into their slots as one reader submission (numpy
        and pread only: any thread). Experts adjacent on disk share a read. Returns, per
        item, when its bytes count as arrived (see ShardReader.read_runs)."""
        k = len(items)
        if not k:
            return []
        if (self.prereader is not None and self.upload is not None and self.verifier is None
                and self.deciding_thread == threading.get_ident()):  # device-wait's service, while steps run
            staged = self._take_staged(L, items)
            if staged:  # read the rest; the staged ones only need their copies listed
                rest = iter(self._read_experts(L, [it for i, it in enumerate(items) if i not in staged], checked))
                return [staged[i] if i in staged else next(rest) for i in range(k)]
        per = max(1, MAX_STAGING // self.bytes_on_disk_per_expert)
        if self.upload is not None and k > per:  # device copies: in pieces that fit a thread's staging
            return [t for i in range(0, k, per) for t in self._read_experts(L, items[i : i + per], checked)]
        if self.verifier is None and L.lean and self.reader.plain_reads(k * self.bytes_on_disk_per_expert, L.files):
            return self._read_small(L, items, checked)
        return self._read_planned([(L, items)], checked)[0]

    def reserve_post(self, layer: int, experts: list, limit: int) -> tuple:
        """Slots for the absent ones of `experts` (at most `limit`), for a post (device_wait):
        free slots first, then the policy's victims, evicted now. Returns ([(expert, slot)],
        [(victim, slot)], the layer's table as it will be once the post is taken); nothing is
        mapped until `settle_post` says whether the device took it."""
        L = self.layers[layer]
        with self._lock:
            want = [e for e in dict.fromkeys(experts) if L.slot_of[e] < 0 and e not in L.pending][:limit]
            slots = self._take_slots(L, len(want), set()) if want else []
            items = list(zip(want, slots))
            victims = [(int(L.expert_in[slot]), slot) for slot in slots if L.expert_in[slot] >= 0]
            for slot in slots:
                L.expert_in[slot] = -2
            table = L.slot_of.copy()
            for e, slot in items:
                table[e] = slot
        return items, victims, table

    def settle_post(self, layer: int, items: list, victims: list, taken: bool):
        """A post's end: taken, its experts are resident (brought in by a guess); not taken, the
        slots hold what they held and the victims are resident again."""
        L = self.layers[layer]
        with self._lock:
            if taken:
                for e, slot in items:
                    self._map(L, e, slot, True)
                return
            for _, slot in items:
                L.expert_in[slot] = -1
            for v, slot in victims:
                if L.slot_of[v] < 0 and L.expert_in[slot] == -1:
                    L.slot_of[v], L.expert_in[slot] = slot, v
                    L.policy.added(v)
                    L.counters.evictions -= 1
            L.dirty = L.gate_stale = L.wait_stale = True

    def _take_staged(self, L: LayerSlots, items: list) -> dict:
        """{item index: arrival} for the items of `items` [(expert, slot)] whose bytes the
        `prereader` has staged (preread.py): their copies are listed from there, no read."""
        if any(p.convert for p in L.params.values()):
            return {}
        layer, pre, up = L.index, self.prereader, self.upload
        got = {}
        for i, (e, slot) in enumerate(items):
            s = pre.take(layer, e)
            if s is None:
                continue
            at = pre.offsets(layer)
            copies = [(p.addr, p.addr + slot * p.source.nbytes, at[name], p.source.nbytes) for name, p in L.params.items()]
            self._copy_to_device(up, copies, source=s.buf)
            got[i] = s.ready
        return got

    def _read_planned(self, batches: list, checked: bool = False) -> list:
        """Read [(layer slots, [(expert, slot)])] (all of them fitting one thread's staging)
        as one reader submission: one thread's batch is shared out by the reader, so
        several layers' experts read together keep every reader thread busy. Returns per
        batch, per item, when its bytes count as arrived."""
        up, staged = self._upload_for(sum(len(items) for _, items in batches))
        plans, runs, copies, pos = [], [], [], 0
        for L, items in batches:
            plan = _ReadPlan(L, items)
            pos = plan.build(up, staged, pos, copies)
            plans.append(plan)
            runs += plan.runs
        done = self.reader.read_runs(runs, checked=checked)  # unless `checked`: each shard unchanged (one stat)
        at = 0
        for plan in plans:
            plan.done, at = done[at : at + len(plan.runs)], at + len(plan.runs)
        if self.verifier is not None:  # before anything is converted or mapped
            for plan in plans:
                plan.verify(self.verifier, self.layers.index(plan.L))
        if copies:
            self._copy_to_device(up, copies)
        return [plan.finish() for plan in plans]

    def _read_small(self, L: LayerSlots, items: list, checked: bool = False) -> list[float]:
        """`_read_experts` for a batch one thread reads best (most demand loads): one pread
        per tensor per run of experts adjacent on disk, straight into the slots; bf16 scales
        for float32 slots read into staging rows and converted for the whole batch in one
        strided copy; no per-batch planning. Per-expert Python work is what this path costs
        on small experts (measured on the demo: 51 us an expert with per-tensor conversions,
        against 15 us for the nine preads alone; now ~20)."""
        started = time.perf_counter()
        if not checked:
            for path in L.files:
                self.reader.check(path)
        plan = L.read_plan or self._make_read_plan(L)
        items = sorted(items)
        k = len(items)
        experts = [e for e, _ in items]
        adjacent = any(b == a + 1 for a, b in zip(experts, experts[1:]))
        preadv, calls, t = os.preadv, 0, None
        up, staged = self._upload_for(k)
        copies, pos = [], 0
        try:
            for t in plan:
                fds, offsets, n = t.fds, t.offsets, t.nbytes
                if t.high is not None:
                    dest, halves = t.staging(k)
                elif up is not None:  # into staging; the copy engine writes the slots below
                    dest = [staged[pos + i * n : pos + (i + 1) * n] for i in range(k)]
                    copies += [(t.addr, t.addr + s * n, pos + i * n, n) for i, (_, s) in enumerate(items)]
                    pos += k * n
                else:
                    dest = t.rows
                slot_or_row = [s for _, s in items] if t.high is None and up is None else range(k)
                if adjacent:  # one read per run of neighbours on disk
                    for i, j in t.runs(experts):
                        views = [dest[r] for r in slot_or_row[i:j]]
                        got = preadv(fds[experts[i]], views, offsets[experts[i]])
                        if got != (j - i) * n:  # short (rare): finish it, or a clear error at the end of file
                            _finish_short(fds[experts[i]], offsets[experts[i]], views, got, t.paths)
                        calls += 1
                else:
                    for e, r in zip(experts, slot_or_row):
                        got = preadv(fds[e], [dest[r]], offsets[e])
                        if got != n:
                            _finish_short(fds[e], offsets[e], [dest[r]], got, t.paths)
                    calls += k
                if t.high is not None:
                    # One plain row assignment a slot: right after compute, numpy's fancy
                    # indexing (one call for all) cost ~15 us a tensor against ~3 (demo, 2 cores).
                    high = t.high
                    for i, (_, s) in enumerate(items):
                        high[s] = halves[i]
        except OSError as e:
            raise ShardError(f"{t.paths if t else L.files}: read failed ({e.strerror or e})") from None
        if copies:
            self._copy_to_device(up, copies)
        return self.reader.account([self.bytes_on_disk_per_expert] * k, calls, started)

    def _upload_for(self, k: int):
        """(device upload, this thread's staging bytes) for a batch of `k` experts, or
        (None, None): host writes (no device copies here, a batch larger than a thread's
        staging — `_read_experts` cuts batches to fit, and one expert always does — or a
        driver that refused: `upload_error`)."""
        if k > 1 and k * self.bytes_on_disk_per_expert > MAX_STAGING:
            return None, None
        return self._staging(k * self.bytes_on_disk_per_expert)

    def _staging(self, nbytes: int):
        """(device upload, this thread's page-locked staging as bytes) or (None, None)."""
        up = self.upload
        if up is None:
            return None, None
        try:
            return up, memoryview(up.staging(nbytes))
        except OSError as e:  # no page-locked memory to be had: host writes from now on
            if getattr(self._local, "upload", _UNSET) is not _UNSET:
                raise  # this thread's own upload (device-wait's pulled loads): no host writes
            self.upload, self.upload_error = None, str(e)
            return None, None

    def _copy_to_device(self, up, copies: list, source=None):
        # On a driver error the host wrote them instead.
        up.copy(copies, wait=self._queue_on != threading.get_ident(), source=source)
        if up.failed is not None:
            self.upload, self.upload_error = None, up.failed

    @contextmanager
    def one_copy_wait(self):
        """Device copies this thread makes inside are waited for once, on leaving: a
        loading layer's experts and its gate table (or every layer a failed optimistic
        step reloads) share one stream wait, ~0.1 ms each on an H200. Nothing inside may
        compute with the slots it loads. Without device copies it does nothing."""
        up = self.upload
        if up is None or self._queue_on is not None:
            yield
            return
        self._queue_on = threading.get_ident()
        try:
            yield
        finally:
            self._queue_on = None
            up.wait()
            if up.failed is not None and self.upload is up:
                self.upload, self.upload_error = None, up.failed

    def _make_read_plan(self, L: LayerSlots) -> list:
        reader = self.reader
        L.read_plan = [
            _TensorReads(
                sorted(set(p.paths)),
                [reader._fds.get(path) or reader._fd(path) for path in p.paths],
                p.offsets,
                p.source.nbytes,
                p.slot_bytes,
                p.bf16_high_halves() if p.convert else None,
                p.followed,
                p.addr,
            )
            for p in L.params.values()
        ]
        return L.read_plan

    def _sync_table(self, L: LayerSlots):
        L.dirty = L.gate_stale = L.wait_stale = True
        if threading.current_thread() is threading.main_thread():
            L.refresh()

    def prewarm(self, plan: dict, stop: threading.Event | None = None) -> int:
        """Load `plan[layer]` (experts, most wanted first) into free slots only, never evicting.

        Safe from a background thread while the model computes: a slot is reserved before
        it is written and the expert mapped only once complete. Reads run on the calling
        thread, one batch per layer (demand loads keep the pool). Returns how many loaded.
        """
        loaded = 0
        for layer, experts in plan.items():
            if stop is not None and stop.is_set():
                break
            L = self.layers[layer]
            with self._lock:
                free = np.flatnonzero(L.expert_in == -1).tolist()
                wanted = [int(e) for e in experts if L.slot_of[int(e)] < 0 and int(e) not in L.pending]
                batch = self._reserve(L, list(zip(wanted, free)), prefetch=False)
            self._run_batch(L, batch, prefetch=False)
            for *_, fut in batch:
                fut.result()
            loaded += len(batch)
        return loaded

    def fill_identity(self, layer: int):
        """Load every expert into the slot of the same number (budget covers all experts)."""
        L = self.layers[layer]
        assert L.num_slots == L.num_experts
        with deferred_sigint(), self._lock:
            t0 = time.perf_counter()
            todo = [(e, e) for e in range(L.num_experts) if L.slot_of[e] != e]
            ready = self._read_experts(L, todo)  # one batch: whole tensors in a few reads
            for e, _ in todo:
                L.counters.bytes_read += self.bytes_on_disk_per_expert
                L.slot_of[e] = e
                L.expert_in[e] = e
                L.policy.added(e)
            self._sync_table(L)
        wait_until(max(ready, default=0.0))  # the (simulated) drive; interruptible
        L.counters.load_s += time.perf_counter() - t0
