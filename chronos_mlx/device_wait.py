"""The device waits for the host, and only on a miss (CUDA).

Per-layer routing reads every MoE layer's expert ids back to the host before its experts are
computed: the host waits for the device 48 times a token, and the device drains its queue each
time. Here the host never waits. A small kernel sits in front of each layer's expert products:
it looks the layer's ids up in the layer's *wait table* (device memory: the slot of each
resident expert, `ABSENT` for the rest). When every id is resident it writes their slots and
the layer computes at once, with no host involvement at all. When one is absent it publishes
the ids to a *mailbox* in page-locked host memory and spins until the host answers; a service
thread (`MissService`), blocked in the CUDA driver until then, loads the missing experts, writes
the table, and answers. The kernel then reads the slots from the table it now trusts.

Exact by construction: an expert's product is computed only from a slot the table says holds
it, and the host changes a layer's slots and table only while that layer's kernel is waiting
for it (nothing queued after it has run yet). A kernel that waits too long (the service died)
gives up, marks the mailbox, and the decode loop refuses the step.

`available()` says whether this backend can do it: MLX's CUDA backend with `mx.fast.cuda_kernel`
and the CUDA driver's stream memory operations.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

import mlx.core as mx
import numpy as np

ABSENT = 0xFFFFFFFF
# Mailbox words (uint32, page-locked host memory the device reads and writes over PCIe).
PUB, ACK, LAYER, COUNT, GAVE_UP, TAG, N_TABLE, N_COPIES = 0, 1, 2, 3, 4, 5, 6, 7
IDS = 16
MAX_IDS = 1024 - IDS
WORDS = 16384  # 64 KB
# Pulled loads (`DevicePull`): the layer's new wait table, then the copies as uint64 triples.
TABLE_AT, MAX_TABLE = 1024, 4096
COPIES_AT = (TABLE_AT + MAX_TABLE) // 2  # in uint64 words
MAX_COPIES = (WORDS // 2 - COPIES_AT) // 3
# About 10 s at an H200's clock before a kernel stops waiting (the service is gone).
WAIT_LIMIT_CYCLES = 20_000_000_000

# Publish this layer's request and spin until the host answers (one thread; `mb`, `ids` in scope).
_ASK = """
        unsigned int seq = mb[0] + 1u;
        mb[2] = layer[0];
        mb[3] = N;
        mb[5] = tag[0];
        for (int i = 0; i < N; ++i) mb[16 + i] = ids[i];
        __threadfence_system();
        mb[0] = seq;
        __threadfence_system();
        long long t0 = clock64();
        while (mb[1] != seq) {
            if (clock64() - t0 > LIMIT) { mb[4] = seq; break; }
            __nanosleep(500);
        }
        __threadfence_system();
"""

_SOURCE = """
    volatile unsigned int* mb = reinterpret_cast<volatile unsigned int*>(box[0]);
    volatile const unsigned int* tab = reinterpret_cast<volatile const unsigned int*>(table);
    bool resident = !ALWAYS;
    if (resident) {
        for (int i = 0; i < N; ++i) {
            if (tab[ids[i]] == 0xFFFFFFFFu) { resident = false; break; }
        }
    }
    if (!resident) {""" + _ASK + """    }
    for (int i = 0; i < N; ++i) {
        unsigned int s = tab[ids[i]];
        slots[i] = s == 0xFFFFFFFFu ? 0u : s;
    }
"""

# The same handshake (thread 0), then the whole block takes the host's answer: the layer's new
# wait table and the list of copies (page-locked staging -> slots) that `_PULL_COPY` makes.
_PULL_SOURCE = """
    volatile unsigned int* mb = reinterpret_cast<volatile unsigned int*>(box[0]);
    volatile unsigned int* tab = reinterpret_cast<volatile unsigned int*>(const_cast<unsigned int*>(table));
    __shared__ int asked;
    int t = threadIdx.x;
    if (t == 0) {
        bool resident = !ALWAYS;
        if (resident) {
            for (int i = 0; i < N; ++i) {
                if (tab[ids[i]] == 0xFFFFFFFFu) { resident = false; break; }
            }
        }
        asked = resident ? 0 : 1;
        if (!resident) {""" + _ASK + """        }
    }
    __syncthreads();
    unsigned long long n_copies = 0;
    if (asked) {
        unsigned int n_table = mb[6];
        for (unsigned int i = t; i < n_table; i += blockDim.x) tab[i] = mb[TABLE_AT + i];
        n_copies = mb[7];
        if (n_copies > MAXC) n_copies = MAXC;
        volatile unsigned long long* cl = reinterpret_cast<volatile unsigned long long*>(mb) + COPIES_AT;
        for (unsigned long long i = t; i < 3 * n_copies; i += blockDim.x) plan[1 + i] = cl[i];
    }
    if (t == 0) plan[0] = n_copies;
    __threadfence();
    __syncthreads();
    for (int i = t; i < N; i += blockDim.x) {
        unsigned int s = tab[ids[i]];
        slots[i] = s == 0xFFFFFFFFu ? 0u : s;
    }
"""

# Copy [(source, destination, bytes)] with every thread of the grid; sources are page-locked
# host memory read over PCIe (uncached loads: a buffer is refilled between requests).
_PULL_COPY = """
    unsigned long long count = plan[0];
    size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (unsigned long long c = 0; c < count; ++c) {
        unsigned long long src = plan[1 + 3 * c], dst = plan[2 + 3 * c], n = plan[3 + 3 * c];
        size_t whole = ((src | dst) & 15) == 0 ? n / 16 : 0;
        const uint4* s4 = reinterpret_cast<const uint4*>(src);
        uint4* d4 = reinterpret_cast<uint4*>(dst);
        for (size_t i = tid; i < whole; i += stride) d4[i] = __ldcv(s4 + i);
        const volatile unsigned char* s1 = reinterpret_cast<const volatile unsigned char*>(src);
        unsigned char* d1 = reinterpret_cast<unsigned char*>(dst);
        for (size_t i = whole * 16 + tid; i < n; i += stride) d1[i] = s1[i];
    }
    if (tid == 0) done[0] = (unsigned int)count;
"""

PULL_BLOCKS, PULL_THREADS = 64, 256

_kernels: dict = {}


def available() -> bool:
    """MLX's CUDA backend is the default device and can run custom kernels."""
    try:
        return mx.default_device() == mx.gpu and mx.cuda.is_available() and hasattr(mx.fast, "cuda_kernel")
    except AttributeError:
        return False


def _get_kernel(kind: str = "wait"):
    if kind not in _kernels:
        limit = f"{WAIT_LIMIT_CYCLES}LL"
        if kind == "wait":
            _kernels[kind] = mx.fast.cuda_kernel(
                name="chronos_wait_for_experts",
                input_names=["ids", "table", "box", "layer", "tag"],
                output_names=["slots"],
                source=_SOURCE.replace("LIMIT", limit),
            )
        elif kind == "pull":
            src = _PULL_SOURCE.replace("LIMIT", limit).replace("TABLE_AT", str(TABLE_AT)).replace("COPIES_AT", str(COPIES_AT))
            _kernels[kind] = mx.fast.cuda_kernel(
                name="chronos_wait_and_plan_pull",
                input_names=["ids", "table", "box", "layer", "tag"],
                output_names=["slots", "plan"],
                source=src,
            )
        else:
            _kernels[kind] = mx.fast.cuda_kernel(
                name="chronos_pull_experts", input_names=["plan"], output_names=["done"], source=_PULL_COPY
            )
    return _kernels[kind]


def max_copies(n_ids: int) -> int:
    """How many copies a pulled answer to a request of `n_ids` ids may list (the kernel's
    plan has room for that many): nine tensors an expert, fewer when adjacent ones merge."""
    return min(MAX_COPIES, 16 * n_ids)


def wait_for_experts(ids: mx.array, table: mx.array, box: mx.array, layer: mx.array, tag: mx.array | None = None,
                     always: bool = False, pull: bool = False) -> mx.array:
    """Slot ids for `ids` (any shape, at most MAX_IDS), once every one is resident.

    `table`: the layer's wait table; `box`: the mailbox address (uint64[1]); `layer`: the
    layer number and `tag` the pass's number (uint32[1] each: a request names both). `always`
    publishes even when everything is resident (to measure the round trip). `pull`: the host
    answers with the new table and a list of copies (`DevicePull`), which the device makes
    before the slots are used."""
    n = ids.size
    if n > MAX_IDS:
        raise ValueError(f"{n} expert ids do not fit the mailbox ({MAX_IDS})")
    flat = ids.reshape(-1)
    if flat.dtype != mx.uint32:
        flat = flat.astype(mx.uint32)
    inputs = [flat, table, box, layer, layer if tag is None else tag]
    template = [("N", n), ("ALWAYS", int(always))]
    if not pull:
        out = _get_kernel("wait")(inputs=inputs, template=template, grid=(1, 1, 1), threadgroup=(1, 1, 1),
                                  output_shapes=[(n,)], output_dtypes=[mx.uint32])[0]
        return out.reshape(ids.shape)
    maxc = max_copies(n)
    slots, plan = _get_kernel("pull")(inputs=inputs, template=template + [("MAXC", maxc)], grid=(128, 1, 1),
                                      threadgroup=(128, 1, 1), output_shapes=[(n,), (1 + 3 * maxc,)],
                                      output_dtypes=[mx.uint32, mx.uint64])
    done = _get_kernel("copy")(inputs=[plan], grid=(PULL_BLOCKS * PULL_THREADS, 1, 1),
                               threadgroup=(PULL_THREADS, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.uint32])[0]
    return mx.depends(slots, done).reshape(ids.shape)


class Mailbox:
    """WORDS uint32 words that the device and the host both read and write: page-locked
    host memory the device addresses over PCIe (`pinned`), or plain memory for a host
    stand-in of the kernel (tests)."""

    def __init__(self, words: np.ndarray, device_address: int, free=None):
        self.words = words
        self.words[:] = 0
        self.device_address = device_address
        self.box = mx.array(np.array([device_address], dtype=np.uint64))
        self._free = free

    @classmethod
    def pinned(cls, lib) -> "Mailbox":
        ptr = ctypes.c_void_p()
        err = lib.cuMemHostAlloc(ctypes.byref(ptr), WORDS * 4, 0x1 | 0x2)  # PORTABLE | DEVICEMAP
        if err:
            raise OSError(f"CUDA driver: cuMemHostAlloc returned error {err}")
        dptr = ctypes.c_uint64()
        err = lib.cuMemHostGetDevicePointer_v2(ctypes.byref(dptr), ptr, 0)
        if err:
            lib.cuMemFreeHost(ptr)
            raise OSError(f"CUDA driver: cuMemHostGetDevicePointer returned error {err}")
        words = np.ctypeslib.as_array((ctypes.c_uint32 * WORDS).from_address(ptr.value))
        return cls(words, dptr.value, free=lambda: lib.cuMemFreeHost(ptr))

    @classmethod
    def host(cls) -> "Mailbox":
        words = np.zeros(WORDS, dtype=np.uint32)
        return cls(words, words.ctypes.data)

    def answer_pull(self, table: np.ndarray, copies: list):
        """Put a pulled load's answer in the mailbox: the layer's new wait table and the
        copies [(source, destination, bytes)] the device makes (`wait_for_experts(pull=True)`)."""
        if len(table) > MAX_TABLE or len(copies) > MAX_COPIES:
            raise ValueError(f"a pulled load of {len(copies)} copies for {len(table)} experts does not fit the mailbox")
        w = self.words
        w[TABLE_AT : TABLE_AT + len(table)] = table
        w.view(np.uint64)[COPIES_AT : COPIES_AT + 3 * len(copies)] = np.asarray(copies, dtype=np.uint64).reshape(-1)
        w[N_TABLE], w[N_COPIES] = len(table), len(copies)

    def close(self):
        free, self._free = self._free, None
        if free is not None:
            free()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def host_kernel(mailbox: Mailbox):
    """`wait_for_experts` done by the host, for backends without the kernel (tests): the
    same mailbox protocol, with the calling thread in the device's place."""

    def wait(ids, table, box, layer, tag=None, always=False, pull=False):
        flat = np.array(ids).reshape(-1).astype(np.uint32)
        words = mailbox.words
        if always or (np.array(table)[flat] == ABSENT).any():
            seq = (int(words[PUB]) + 1) & 0xFFFFFFFF
            words[LAYER], words[COUNT] = int(np.array(layer)[0]), flat.size
            words[TAG] = int(np.array(layer if tag is None else tag)[0])
            words[IDS : IDS + flat.size] = flat
            words[PUB] = seq
            while int(words[ACK]) != seq:
                time.sleep(20e-6)
            if pull:  # the device's part of a pulled load: the new table, then the copies
                from .cache import _numpy_view

                n_table, n_copies = int(words[N_TABLE]), int(words[N_COPIES])
                _numpy_view(table)[:n_table] = words[TABLE_AT : TABLE_AT + n_table]
                for src, dst, n in words.view(np.uint64)[COPIES_AT : COPIES_AT + 3 * n_copies].reshape(-1, 3).tolist():
                    ctypes.memmove(dst, src, n)
        slots = np.array(table)[flat]
        return mx.array(np.where(slots == ABSENT, 0, slots).astype(np.uint32).reshape(ids.shape))

    return wait


class MissService:
    """A thread that answers the device's requests: `handle(layer, ids, tag)` loads what is
    missing and writes the layer's wait table (returning once both are where the device
    reads them); then the request is answered.

    The thread polls the mailbox while active (`resume` / `pause`), sleeping `poll_s`
    between looks (Python's lock is free while it sleeps). A CUDA stream waiting on the mailbox (`cuStreamWaitValue32`) would
    spare the polling but can deadlock: it may share a hardware queue with MLX's stream and
    hold back the very kernel that would publish the request."""

    def __init__(self, mailbox: Mailbox, handle, poll_s: float = 20e-6, active: bool = True):
        self.mailbox, self._handle, self.poll_s = mailbox, handle, poll_s
        self.requests = 0
        self.error: BaseException | None = None
        self._stop = False
        self._active = threading.Event()
        if active:
            self._active.set()
        self._thread = threading.Thread(target=self._run, name="chronos-miss-service", daemon=True)
        self._thread.start()

    def resume(self):
        """Poll the mailbox (while steps run)."""
        self._active.set()

    def pause(self):
        """Stop polling (nothing may be waiting for an answer): an idle model costs no CPU."""
        self._active.clear()

    def _run(self):
        words, sleep = self.mailbox.words, time.sleep
        served = int(words[PUB])
        while not self._stop:
            if not self._active.is_set():
                self._active.wait(0.5)
                continue
            if int(words[PUB]) == served:
                sleep(self.poll_s)
                continue
            served = int(words[PUB])
            layer, n, tag = int(words[LAYER]), int(words[COUNT]), int(words[TAG])
            ids = words[IDS : IDS + n].copy()
            try:
                self._handle(layer, ids, tag)
            except BaseException as e:  # noqa: BLE001 - the decode loop raises it after the step
                if self.error is None:
                    self.error = e
            self.requests += 1
            words[ACK] = served

    def stop(self):
        """End the thread (call only while no request is outstanding)."""
        self._stop = True
        self._thread.join(timeout=5)


def driver():
    """libcuda with the calls used here typed (64-bit addresses)."""
    from .upload import _driver

    lib = _driver()
    lib.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    return lib


class DevicePull:
    """Takes the copy engine's place (`upload.DeviceUpload`'s calls) on the service thread:
    expert bytes are read into page-locked staging, and the copies into the slots are listed
    (`take`) for the waiting kernel, which makes them itself. Staging is handed out in turn
    until the list is taken: nothing is reused before the device has copied it."""

    def __init__(self, alloc):
        self._alloc = alloc  # nbytes -> uint8 array (page-locked on CUDA)
        self._bufs: list = []
        self._at = (0, 0)  # (buffer, byte) where the next staging starts
        self._last = 0  # address of the last staging handed out
        self._pending: list = []
        self.copies = self.bytes = 0
        self.failed = None

    def staging(self, nbytes: int) -> np.ndarray:
        i, pos = self._at
        while True:
            if i == len(self._bufs):
                self._bufs.append(self._alloc(max(64 << 20, nbytes)))
            buf = self._bufs[i]
            if pos + nbytes <= len(buf):
                break
            i, pos = i + 1, 0
        out = buf[pos : pos + nbytes]
        self._at = (i, pos + (nbytes + 15) // 16 * 16)  # 16-byte aligned: the device copies 16 at a time
        self._last = out.ctypes.data
        return out

    def copy(self, copies: list, wait: bool = True, source: np.ndarray | None = None):
        base = self._last if source is None else source.ctypes.data
        merged = []
        for array, dst, off, n in sorted(copies):
            last = merged[-1] if merged else None
            if last and last[0] == array and last[2] + last[3] == dst and last[1] + last[3] == base + off:
                last[3] += n
            else:
                merged.append([array, base + off, dst, n])
        self._pending += [(src, dst, n) for _, src, dst, n in merged]
        self.copies += len(merged)
        self.bytes += sum(n for *_, n in merged)

    def wait(self):
        pass  # the device copies after the answer

    def table_staging(self, nbytes: int):
        raise RuntimeError("a pulled load writes no table through staging (the mailbox carries it)")

    def take(self) -> list:
        """The copies listed since the last take, as [(source, destination, bytes)]."""
        out, self._pending, self._at = self._pending, [], (0, 0)
        return out


def pinned_alloc(lib):
    """nbytes -> a page-locked uint8 array the device can read (kept for the process)."""

    def alloc(nbytes: int) -> np.ndarray:
        ptr = ctypes.c_void_p()
        err = lib.cuMemHostAlloc(ctypes.byref(ptr), nbytes, 0x1 | 0x2)  # PORTABLE | DEVICEMAP
        if err:
            raise OSError(f"CUDA driver: cuMemHostAlloc returned error {err}")
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr.value))

    return alloc


class DeviceWaiter:
    """Device-wait routing's state for one streamed model (`Runtime.waiter`): the mailbox,
    the service thread, one wait table per MoE layer, and the ids of the pass being built.

    While the decode loop builds a step, `route` puts each MoE layer's ids through
    `wait_for_experts`; `end_pass` gives back every layer's ids as one array, which the loop
    reads once the step has run and hands to `account` (hits, the policy, observers). The
    service thread is the only one that changes slots while steps run (`begin` waits out
    every load in flight and starts no prefetch)."""

    def __init__(self, runtime, mailbox: Mailbox | None = None, kernel=None, pull: bool | None = None,
                 staging_alloc=None):
        """`mailbox`, `kernel`, `staging_alloc`: a host stand-in (`Mailbox.host()`,
        `host_kernel`, numpy buffers) where there is no CUDA (tests); by default page-locked
        memory and the CUDA kernels. `pull` (default: CHRONOS_DEVICE_PULL=1): loads are
        copied by the waiting kernel from page-locked staging (`DevicePull`) instead of
        written into managed memory by the host."""
        self.runtime = runtime
        cache = runtime.cache
        if pull is None:
            pull = os.environ.get("CHRONOS_DEVICE_PULL", "0") == "1"
        needs_driver = mailbox is None or (pull and staging_alloc is None)
        lib = driver() if needs_driver else None
        self.mailbox = mailbox if mailbox is not None else Mailbox.pinned(lib)
        self._kernel = kernel or wait_for_experts
        self.pull = DevicePull(staging_alloc or pinned_alloc(lib)) if pull else None
        self.tables, self.views, self.layer_ids = [], [], []
        from .cache import _numpy_view

        for i, L in enumerate(cache.layers):
            t = mx.full((L.num_experts,), ABSENT, dtype=mx.uint32)
            mx.eval(t)
            self.tables.append(t)
            self.views.append(_numpy_view(t))
            self.layer_ids.append(mx.array([i], dtype=mx.uint32))
            L.wait_stale = True
        mx.eval(self.layer_ids)
        self._loaded: dict = {}  # (pass, layer) -> experts loaded at its request, until accounted
        self._passes = 0
        self._tag = None
        self._lock = threading.Lock()
        self.requests = 0
        self._gave_up = int(self.mailbox.words[GAVE_UP])
        self._pass: list = []
        self.service = MissService(self.mailbox, self._handle, active=False)

    def begin(self):
        """Before steps are launched (nothing queued): from now on every thread writes slots
        from the host (a copy-engine copy would wait for a kernel that waits for it), no
        load is in flight, every table is current."""
        cache = self.runtime.cache
        cache.copy_engine_paused = True
        cache.wait_for_loads()
        for i, view in enumerate(self.views):
            cache.write_wait_table(i, view)
        self.service.resume()

    def end(self, stream=None):
        """After the last step: once everything queued on `stream` has run (the service still
        answering), the service stops polling and the copy engine writes slots again."""
        try:
            mx.synchronize(stream) if stream is not None else mx.synchronize()
        finally:
            self.service.pause()
            self.runtime.cache.copy_engine_paused = False

    def route(self, layer: int, indices: mx.array) -> mx.array:
        if not self._pass:  # a new pass: its requests carry its number
            self._passes = (self._passes + 1) & 0xFFFFFFFF
            self._tag = mx.array([self._passes], dtype=mx.uint32)
        self._pass.append((layer, indices))
        return self._kernel(indices, self.tables[layer], self.mailbox.box, self.layer_ids[layer], self._tag,
                            pull=self.pull is not None)

    def end_pass(self):
        """(pass, layers, sizes, every id as one flat array) of the pass just built, or None."""
        got, self._pass = self._pass, []
        if not got:
            return None
        flat = mx.concatenate([i.reshape(-1) for _, i in got])
        return self._passes, [l for l, _ in got], [i.size for _, i in got], flat

    def _handle(self, layer: int, ids: np.ndarray, tag: int = 0):
        """On the service thread, while layer `layer`'s kernel waits: load, then the table."""
        runtime, cache = self.runtime, self.runtime.cache
        uniq = sorted(set(ids.tolist()))
        if self.pull is not None:  # read into staging; the waiting kernel copies and takes the table
            got = self._pulled_load(layer, uniq, ids)
        else:
            with cache.uploading_with(None):  # host writes (already so while steps run: begin)
                try:
                    got = runtime.load_for(layer, uniq, count_hits=False)
                finally:  # also after a failed load: the table says what the slots hold
                    cache.write_wait_table(layer, self.views[layer], force=True)
        with self._lock:
            self._loaded.setdefault((tag, layer), set()).update(got)
            self.requests += 1

    def _pulled_load(self, layer: int, uniq: list, ids: np.ndarray) -> list:
        """Read into staging and answer with the layer's table and the copies. On any failure
        the layer is emptied and the answer says every expert is absent: experts mapped whose
        bytes never reached their slots must not look resident to any later step."""
        runtime, cache, words = self.runtime, self.runtime.cache, self.mailbox.words
        words[N_TABLE] = words[N_COPIES] = 0  # nothing of an earlier answer may be applied again
        L = cache.layers[layer]
        try:
            with cache.uploading_with(self.pull):
                got = runtime.load_for(layer, uniq, count_hits=False)
            copies = self.pull.take()
            if len(copies) > max_copies(len(ids)):  # the kernel would drop some
                raise RuntimeError(f"layer {layer}: {len(copies)} copies for {len(ids)} ids do not fit the kernel's plan")
            with cache._lock:
                table = L.slot_of.astype(np.uint32)
                L.wait_stale = False
            self.mailbox.answer_pull(table, copies)
            return got
        except BaseException:
            self.pull.take()
            cache.forget_layer(layer)
            self.mailbox.answer_pull(np.full(L.num_experts, ABSENT, dtype=np.uint32), [])
            raise

    def account(self, tag: int, layers: list, sizes: list, host: np.ndarray):
        """A step's routing, read once it ran: uses of experts not loaded for it are hits;
        the policy and observers hear of every layer."""
        runtime, cache = self.runtime, self.runtime.cache
        pos = 0
        for layer, n in zip(layers, sizes):
            inds = host[pos : pos + n]
            pos += n
            uniq = np.unique(inds)
            with self._lock:
                got = self._loaded.pop((tag, layer), set())
            L = cache.layers[layer]
            L.counters.hits += inds.size - sum(1 for e in uniq.tolist() if e in got)
            cache.mark_used(layer, uniq)
            runtime._observe(layer, inds)

    def check(self):
        """Raise if a request failed or a kernel stopped waiting: that step is not exact."""
        err = self.service.error
        if err is not None:
            self.service.error = None
            raise RuntimeError(f"loading experts for the device failed: {err}") from err
        gave_up = int(self.mailbox.words[GAVE_UP])
        if gave_up != self._gave_up:
            self._gave_up = gave_up
            raise RuntimeError("a MoE layer stopped waiting for its experts (the loading thread did not answer)")

    def close(self):
        self.service.stop()
        self.mailbox.close()
