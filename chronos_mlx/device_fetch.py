"""The device fetches its own misses from the shards in host memory (CUDA; `--sync device-fetch`).

Device-wait routing (device_wait.py) answers each miss through a host thread: the kernel
asks, the thread reads the experts into staging, chooses victims and answers — ~0.5–1 ms a
request on the H200, 40-odd requests a token at half the experts. Here no host thread takes
part while steps run. The shard files are mapped and registered with the GPU
(`cuMemHostRegister`, read-only: their pages locked in host memory, which the device reads
over PCIe), and each MoE layer's kernel (fetch_kernels.py) chooses slots for its absent
experts itself — a free slot, else the least-used resident expert the call does not use, by
the same decayed-use order as the `usage` policy — and copies their bytes from the
registered shards; the products read the slots after the copies. The host reads the step's
ids and per-layer counts once the step has run — checked before its token is given out,
recorded (hits, misses, bytes, the policy's history) on a worker thread while the next step
is launched — and the slots' owners when the generation ends, so prefill and the other modes
find the cache as the device left it.

With a predictor, each layer's fetch is followed by a prefetch of the predictor's guesses
for the next layer (the same kernel, `guess`): it waits for this layer's copies and runs
beside this layer's products; the next layer's fetch waits for it. (Measured on the H200,
session 24: it spared ~70 % of the misses and decoded slower, while the guesses still came from
the predictor's own stream — a host wait a layer, fixed since — and wrong guesses are bytes.
`default_predictor` stays `none`.)

The cost: the whole of every shard is held page-locked in host memory while the model is
loaded (the GPU's memory still holds only the budget). That is the page cache's copy, not
a second one, but it is locked: use it where host memory holds the model and the GPU does
not. It refuses shards larger than most of the host's memory, experts whose resident dtype
differs from the disk's (the device copies bytes as they are), and a simulated drive.

Exact by construction, as device-wait: a layer's slots and table change only inside its
own kernel, which runs after every kernel queued before it (each takes the previous one's
output) and before its products (which read the slots the copies hand on); victims are
never among the call's experts.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from .device_wait import _drain
from .errors import ChronosError, DeviceWaitError
from .fetch_kernels import HEAD, Journal, fetch_experts
from .wait_kernels import ABSENT, driver

# Page-locked mappings of more than this share of the host's memory are refused.
MAX_HOST_SHARE = 0.85
_PAGE = mmap.PAGESIZE


def host_memory_bytes() -> int | None:
    """Physical memory of this host (Linux /proc/meminfo, or sysconf), or None."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _unfit(runtime, share: float) -> str | None:
    """Why device-fetch cannot run this runtime's model (None: it can): the shards must be
    within `share` of host memory."""
    cache = runtime.cache
    if getattr(cache.reader, "simulator", None) is not None:
        return ("--sync device-fetch reads the shards from host memory: a simulated drive (--io-sim) does not "
                "apply; use --sync device-wait")
    for L in cache.layers:
        for name, p in L.params.items():
            if p.convert:
                return (f"--sync device-fetch copies experts as they are on disk, and '{name}' is {p.source.dtype} "
                        f"there but {p.dtype} in memory; load with the checkpoint's dtype or use --sync device-wait")
    total = sum(Path(f).stat().st_size for f in {f for L in cache.layers for f in L.files})
    memory = host_memory_bytes()
    if memory and total > share * memory:
        return (f"--sync device-fetch holds every shard page-locked in host memory: {total / 2**30:.1f} GiB of "
                f"shards against {memory / 2**30:.1f} GiB of memory; use --sync device-wait")
    return None


class RegisteredShards:
    """The shard files mapped read-only and, with `lib` (libcuda), registered with the GPU:
    `address[path]` is the device address of the file's first byte (the host address
    without `lib`, for the host stand-in)."""

    def __init__(self, paths, lib=None):
        self.address: dict = {}
        self._maps: list = []  # (path, file, mmap, numpy view, host address, registered)
        self._lib = lib
        paths = sorted({Path(p) for p in paths})
        if lib is not None:
            from .upload import make_context_current

            lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
            make_context_current(lib)
        try:
            for path in paths:
                self._map(path)
        except BaseException:
            self.close()
            raise

    def _map(self, path: Path):
        f = open(path, "rb")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            f.close()
            raise
        view = np.frombuffer(mm, dtype=np.uint8)
        host = view.ctypes.data
        entry = [path, f, mm, view, host, False]
        self._maps.append(entry)
        if self._lib is None:
            self.address[path] = host
            return
        size = (len(view) + _PAGE - 1) // _PAGE * _PAGE  # the mapping covers whole pages
        # PORTABLE | DEVICEMAP | READ_ONLY (a read-only mapping can be registered only so)
        err = self._lib.cuMemHostRegister_v2(ctypes.c_void_p(host), size, 0x1 | 0x2 | 0x8)
        if err:
            raise ChronosError(f"--sync device-fetch: the GPU could not map {path} (cuMemHostRegister error {err}); "
                               "use --sync device-wait")
        entry[5] = True
        dptr = ctypes.c_uint64()
        err = self._lib.cuMemHostGetDevicePointer_v2(ctypes.byref(dptr), ctypes.c_void_p(host), 0)
        if err:
            raise ChronosError(f"--sync device-fetch: no device address for {path} (error {err}); use --sync device-wait")
        self.address[path] = dptr.value

    def close(self):
        maps, self._maps = self._maps, []
        for path, f, mm, view, host, registered in maps:
            if registered:
                self._lib.cuMemHostUnregister(ctypes.c_void_p(host))
            del view
            try:
                mm.close()
            except BufferError:  # a view still alive somewhere: the mapping goes with it
                pass
            f.close()
        self.address = {}

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class DeviceFetcher:
    """Device-fetch routing's state for one streamed model (`Runtime.waiter`): the registered
    shards, each MoE layer's device arrays (fetch_kernels.py), and the pass being built.
    The decode loop drives it as it drives a `DeviceWaiter`: `begin`, `route` for every MoE
    layer of a step, `end_pass`, `account` once the step ran, `end`."""

    requests = posts = posts_taken = 0  # no host requests, no posts: the stats of DeviceWaiter
    prereader = None

    def __init__(self, runtime, kernel=None, lib=None, register: bool | None = None):
        """`kernel`: `fetch_experts` (default) or the host stand-in `fetch_kernels.host_fetch`;
        `register`: register the shards with the GPU (default: with the CUDA kernel)."""
        self.runtime = runtime
        cache = runtime.cache
        if register is None:
            register = kernel is None
        why = _unfit(runtime, MAX_HOST_SHARE if register else float("inf"))  # unregistered: nothing locked
        if why:
            raise ChronosError(why)
        self._kernel = kernel or fetch_experts
        t0 = time.perf_counter()
        lib = (lib or driver()) if register else None
        self.shards = RegisteredShards({path for L in cache.layers for path in L.files}, lib)
        self.setup_s = time.perf_counter() - t0  # mapping and page-locking the shards (read from disk if cold)
        policy = getattr(cache.layers[0].policy, "name", "lru") if cache.layers else "lru"
        self.lru = policy != "usage"
        self.half_life = int(getattr(cache.layers[0].policy, "half_life", 32)) if cache.layers else 32
        # Each call's ids and counts, written by the kernels, read once the step ran. One sequence
        # decodes top_k ids a layer; routing sends a call here whenever its ids fit the layer's
        # slots, so a row has room for as many ids as the largest layer has slots.
        top_k = int(runtime.info.get("top_k") or 8)
        room = max([64, 4 * top_k] + [L.num_slots for L in cache.layers])
        self.journal = Journal(len(cache.layers), room, lib)
        self.prefetch_journal = Journal(len(cache.layers), room, lib)  # what guesses loaded
        self.state = [self._layer_state(i, L) for i, L in enumerate(cache.layers)]
        self._passes = 1 << 20  # stamps below the first pass's: see `begin`
        self._tag = None
        self._pass: list = []
        self._guessed: list = []  # layers prefetched in the pass being built
        self._guessed_in: dict = {}  # pass -> those layers, until `account`
        self._after = None
        self._warmed = False
        self._pending: list = []  # checked steps whose bookkeeping is still to do (`account`)
        self._worker = None  # the thread that does it beside a launch (`beside`)
        self.resident = frozenset()  # layers that hold every expert (`begin`): routed with no kernel

    def _layer_state(self, layer: int, L) -> dict:
        from .cache import _numpy_view

        params = list(L.params.values())
        base = self.shards.address
        src = np.array([[base[Path(p.paths[e])] + p.offsets[e] for p in params] for e in range(L.num_experts)],
                       dtype=np.uint64).reshape(-1)
        state = {
            "table": mx.full((L.num_experts,), ABSENT, dtype=mx.uint32),
            "owner": mx.full((L.num_slots,), ABSENT, dtype=mx.uint32),
            "score": mx.zeros((L.num_experts,), dtype=mx.float32),
            "stamp": mx.zeros((L.num_experts,), dtype=mx.uint32),
            "src": mx.array(src),
            "dst": mx.array(np.array([p.addr for p in params], dtype=np.uint64)),
            "nbytes": mx.array(np.array([p.source.nbytes for p in params], dtype=np.uint64)),
            "journal": self.journal.address(layer),
            "prefetch_journal": self.prefetch_journal.address(layer),
        }
        mx.eval(list(state.values()))
        state["journal_width"] = self.journal.width
        state["views"] = {k: _numpy_view(state[k]) for k in ("table", "owner", "score", "stamp")}
        return state

    # --- the decode loop's calls --------------------------------------------------------
    def begin(self):
        """Before steps are launched (nothing queued): the device's tables, owners and use
        scores say what the host's cache holds now (prefill may have loaded experts)."""
        cache = self.runtime.cache
        self._pass, self._guessed, self._guessed_in = [], [], {}
        for path in self.shards.address:  # a shard replaced since it was mapped: refused, as every mode does
            cache.reader.check(path)
        cache.wait_for_loads()
        cache.copy_engine_paused = True  # only the kernels write slots while steps run
        self.resident = cache.resident_layers()
        self.warm()
        now = self._passes
        with cache._lock:
            for L, state in zip(cache.layers, self.state):
                v = state["views"]
                v["table"][:] = L.slot_of.astype(np.uint32)  # -1 wraps to ABSENT
                v["owner"][:] = np.where(L.expert_in >= 0, L.expert_in, -1).astype(np.uint32)
                v["score"][:], v["stamp"][:] = self._seed(L.policy, now)

    def _seed(self, policy, now: int) -> tuple:
        """The device's use scores and stamps from the host policy's history: `usage`'s decayed
        uses as of now; otherwise stamps in the policy's eviction order (oldest first)."""
        if hasattr(policy, "live"):
            # Each expert's decayed uses as of its last use, stamped that many passes ago: the
            # same value now, and the same recency order for ties, as the host policy has.
            policy._scale()  # rescales `live` if due; the scale is 2**((clock - base) / half_life)
            value = np.asarray(policy.live, dtype=np.float64) + np.asarray(policy._prior)
            age = np.minimum(policy.clock - np.asarray(policy.last_use, dtype=np.int64), (1 << 20) - 1)
            score = value / np.exp2((policy.clock - age - policy._base) / policy.half_life)
            return score.astype(np.float32), (now - age).astype(np.uint32)
        n = self.state[0]["table"].size if self.state else 0
        stamp = np.full(n, now - n - 1, dtype=np.uint32)
        order = list(getattr(policy, "_order", {}))  # LRU: least recently used first
        stamp[order] = now - len(order) + np.arange(len(order), dtype=np.uint32)
        return np.zeros(n, dtype=np.float32), stamp

    def warm(self):
        """Run the kernels once on a throwaway layer of the same shape (every id resident),
        so MLX compiles them now and not inside the first timed step."""
        if self._warmed or not self.state:
            return
        L = self.runtime.cache.layers[0]
        k = min(int(self.runtime.info.get("top_k") or 1), L.num_slots)
        s = self.state[0]
        dummy = {"table": mx.array(np.arange(L.num_experts, dtype=np.uint32) % L.num_slots),
                 "owner": mx.arange(L.num_slots, dtype=mx.uint32), "score": mx.zeros((L.num_experts,)),
                 "stamp": mx.zeros((L.num_experts,), dtype=mx.uint32), "src": s["src"], "dst": s["dst"],
                 "nbytes": s["nbytes"], "journal": s["journal"], "prefetch_journal": s["prefetch_journal"],
                 "journal_width": s["journal_width"]}
        ids, tag = mx.arange(k, dtype=mx.uint32), mx.array([1], dtype=mx.uint32)
        out = self._kernel(ids, dummy, tag, half_life=self.half_life, lru=self.lru)
        if self.runtime.predictor is not None:  # its guesses go to the prefetch form of the kernel
            out = self._kernel(ids, dummy, tag, after=out, half_life=self.half_life, lru=self.lru, guess=True)
        mx.eval(out)
        self._warmed = True

    def route(self, layer: int, indices: mx.array, guesses=None) -> mx.array:
        """Slot ids for `indices`, through `layer`'s fetch kernel. `guesses` = (the next layer,
        expert ids guessed for it): a prefetch kernel loads the absent ones into that layer's
        slots beside this layer's products (it waits for this layer's copies, and the next
        layer's fetch waits for it: nothing else reads those slots meanwhile)."""
        if not self._pass:
            self._passes = (self._passes + 1) & 0xFFFFFFFF
            self._tag = mx.array([self._passes], dtype=mx.uint32)
        slots = self._kernel(indices, self.state[layer], self._tag, after=self._after,
                             half_life=self.half_life, lru=self.lru)
        self._after = slots
        self._pass.append((layer, indices.size))
        if guesses is not None:
            target, ids = guesses
            self._after = self._kernel(ids, self.state[target], self._tag, after=slots, half_life=self.half_life,
                                       lru=self.lru, guess=True)
            self._guessed.append(target)
        return slots

    def end_pass(self):
        """(pass, layers, sizes, None) of the pass just built, or None: the kernels write its ids
        and counts to the journal, which `account` reads once the step ran (no array to wait on)."""
        got, self._pass = self._pass, []
        guessed, self._guessed = self._guessed, []
        if not got:
            return None
        if guessed:
            self._guessed_in[self._passes] = guessed
        return self._passes, [l for l, _ in got], [n for _, n in got], None

    def account(self, tag: int, layers: list, sizes: list, host=None):
        """A step's routing and what its kernels loaded, read from the journal once it ran.

        The checks that decide whether the step is exact are made now (a stale or failed row
        refuses the step before its token is given out); the bookkeeping (hits, misses, bytes,
        the policy's history, what observers hear) is kept for `beside`, which runs it while the
        next step is launched — MLX launches without Python's lock, and on a GPU the host's work
        a step is the decode's pace. Observers hear each step in order, a step late (they keep
        host-side records: profiles, traces, Belady's bound); `end` and the first token flush."""
        guessed = self._guessed_in.pop(tag, None)
        prefetched = self._read_prefetches(tag, guessed) if guessed else None
        rows = self.journal.read_pass(layers, tag)  # a copy: later passes may reuse the rows
        sizes = np.asarray(sizes)
        stale = (rows[:, 0] != (tag & 0xFFFFFFFF)) | (rows[:, HEAD - 1] != sizes)
        if stale.any():
            layer = layers[int(np.flatnonzero(stale)[0])]
            raise DeviceWaitError(f"MoE layer {layer} left no record of its fetch for this step (pass {tag}); "
                                  "the step was refused")
        failed = rows[:, 3] != 0
        if failed.any():
            layer = layers[int(np.flatnonzero(failed)[0])]
            raise DeviceWaitError(f"MoE layer {layer} could not fetch its experts on the device (no slot free of "
                                  "the call's experts, or an expert id out of range); the step was refused")
        self._pending.append((rows, layers, sizes, guessed, prefetched))

    def _record(self, rows, layers, sizes, guessed, prefetched):
        """The bookkeeping of one checked step (`account`)."""
        runtime, cache = self.runtime, self.runtime.cache
        per_expert = cache.bytes_on_disk_per_expert
        if guessed:  # before the uses: a prefetched expert a layer then used is a prefetch hit
            self._record_prefetches(guessed, prefetched)
        loads, evicted = rows[:, 1].tolist(), rows[:, 2].tolist()
        for i, (layer, n) in enumerate(zip(layers, sizes.tolist())):
            L = cache.layers[layer]
            c = L.counters
            c.hits += n - loads[i]
            c.misses += loads[i]
            c.evictions += evicted[i]
            c.bytes_read += loads[i] * per_expert
            inds = rows[i, HEAD : HEAD + n]
            cache.mark_used(layer, set(inds.tolist()))
            if runtime.observers:
                runtime._observe(layer, inds.copy())

    def flush(self):
        """Do the bookkeeping `account` kept, now (before the cache's figures are read)."""
        pending, self._pending = self._pending, []
        for job in pending:
            self._record(*job)

    def beside(self, launch):
        """`launch()` (an `mx.async_eval` of the next step), with the bookkeeping `account`
        kept done on a worker thread meanwhile: MLX builds and launches a step's graph without
        Python's lock. The worker runs only while `launch` does (it is joined before this
        returns), so no Python state is changed by two threads at once."""
        if not self._pending:
            return launch()
        if self._worker is None:
            from concurrent.futures import ThreadPoolExecutor

            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chronos-bookkeeping")
        done = self._worker.submit(self.flush)
        try:
            return launch()
        finally:
            done.result()

    def _read_prefetches(self, tag: int, layers: list) -> np.ndarray:
        rows = self.prefetch_journal.read_pass(layers, tag)
        stale = rows[:, 0] != (tag & 0xFFFFFFFF)
        if stale.any():
            layer = layers[int(np.flatnonzero(stale)[0])]
            raise DeviceWaitError(f"MoE layer {layer}'s prefetch left no record for this step (pass {tag}); "
                                  "the step was refused")
        return rows

    def _record_prefetches(self, layers: list, rows: np.ndarray):
        cache = self.runtime.cache
        with cache._lock:
            for layer, row in zip(layers, rows):
                loads = int(row[1])
                L = cache.layers[layer]
                L.counters.evictions += int(row[2])
                L.counters.bytes_read += loads * cache.bytes_on_disk_per_expert
                L.prefetched.update(row[HEAD : HEAD + loads].tolist())

    def check(self):
        pass  # no host thread to fail; a kernel's failure is in its counts (`account`)

    def end(self, stream=None):
        """After the last step: once everything queued has run, the host's cache takes the
        slots' owners from the device (what prefill and the other modes route with)."""
        try:
            _drain(stream)
        finally:
            self._after = None
            self.flush()
            self.runtime.cache.copy_engine_paused = False
            self.sync_host()

    def sync_host(self):
        """The host's expert->slot maps and the policy's resident set, from the device's owners."""
        cache = self.runtime.cache
        with cache._lock:
            for L, state in zip(cache.layers, self.state):
                owner = state["views"]["owner"].astype(np.int64)
                owner[owner == ABSENT] = -1
                before = set(np.flatnonzero(L.slot_of >= 0).tolist())
                L.expert_in[:] = owner
                L.slot_of[:] = -1
                held = owner >= 0
                L.slot_of[owner[held]] = np.flatnonzero(held)
                after = set(owner[held].tolist())
                for e in before - after:
                    L.policy.removed(e)
                    L.prefetched.discard(e)
                for e in after - before:
                    L.policy.added(e)
                L.dirty = L.gate_stale = L.wait_stale = True
                L.full = L.identity = False

    def close(self):
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        self.shards.close()
        self.journal.close()
        self.prefetch_journal.close()
