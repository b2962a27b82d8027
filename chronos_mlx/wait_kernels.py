"""The CUDA side of device-wait routing (device_wait.py): the kernels, the mailbox they
share with the host, and a host stand-in of the kernels for machines without CUDA.

Mailbox protocol (uint32 words; page-locked host memory the GPU addresses over PCIe): a kernel
that finds an absent id writes LAYER, COUNT, TAG and the ids, then increments PUB and spins
until the host sets ACK to the same count; a pulled load's answer also carries the layer's new
wait table (from word TABLE_AT) and a list of copies (uint64 triples from uint64 word COPIES_AT),
which the kernels apply before the layer's experts compute. A *post* (POST_ID and the post area)
is such an answer left in advance for one layer's kernel of one pass, which takes it without
asking (TAKEN). After WAIT_LIMIT_CYCLES a kernel stops waiting and sets GAVE_UP. Kernel sources are compiled by MLX (`mx.fast.cuda_kernel`) at
first use; tests/test_device_wait.py also compiles them with NVRTC where there is no GPU.
"""

from __future__ import annotations

import ctypes
import os
import time

import mlx.core as mx
import numpy as np

ABSENT = 0xFFFFFFFF
# Mailbox words (uint32, page-locked host memory the device reads and writes over PCIe).
PUB, ACK, LAYER, COUNT, GAVE_UP, TAG, N_TABLE, N_COPIES, GUESS_LAYER, N_GUESSES = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9
IDS = 16
MAX_IDS = 1024 - IDS
# Pulled loads (`DevicePull`): the layer's new wait table, then the copies as uint64 triples.
TABLE_AT, MAX_TABLE = 1024, 4096
COPIES_AT = (TABLE_AT + MAX_TABLE) // 2  # in uint64 words
# A request may carry guesses for another layer (`wait_for_experts(guesses=...)`), after the copies.
GUESSES_AT, MAX_GUESSES = 16384, 1024
MAX_COPIES = (GUESSES_AT // 2 - COPIES_AT) // 3
# A post (DeviceWaiter._post): a layer's new table and copies the host lists while the device
# computes, for that layer's kernel of one pass to take without asking. POST_ID names the pass
# and layer (`post_id`); the kernel that takes it writes TAKEN, then the post's words are its.
POST_ID, TAKEN, POST_N_TABLE, POST_N_COPIES = 10, 11, 12, 13
POST_TABLE_AT = GUESSES_AT + MAX_GUESSES
POST_COPIES_AT = (POST_TABLE_AT + MAX_TABLE) // 2  # in uint64 words
MAX_POST_COPIES = 512
WORDS = POST_TABLE_AT + MAX_TABLE + 6 * MAX_POST_COPIES  # 96 KB
NO_POST = 0xFFFFFFFF
MAX_POST_LAYERS = 255  # a post id keeps 8 bits of the layer
# About 10 s at an H200's clock before a kernel stops waiting (the service is gone).
WAIT_LIMIT_CYCLES = 20_000_000_000

# Publish this layer's request and spin until the host answers (one thread; `mb`, `ids` in scope).
_ASK = """
        unsigned int seq = mb[0] + 1u;
        mb[2] = layer[0];
        mb[3] = N;
        mb[5] = tag[0];
        for (int i = 0; i < N; ++i) mb[16 + i] = ids[i];
        mb[8] = glayer[0];
        mb[9] = G;
        for (int i = 0; i < G; ++i) mb[GUESSES_AT + i] = guess[i];
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
# With POSTS, a post for this pass and layer is taken first (its table and copies; TAKEN
# written before anything else, so the host knows before any later request); then the
# ids are looked up in the table as it now is, and an answer's copies follow the post's.
_PULL_SOURCE = """
    volatile unsigned int* mb = reinterpret_cast<volatile unsigned int*>(box[0]);
    volatile unsigned int* tab = reinterpret_cast<volatile unsigned int*>(const_cast<unsigned int*>(table));
    __shared__ int asked;
    __shared__ int posted;
    int t = threadIdx.x;
    if (t == 0) {
        posted = 0;
        if (POSTS) {
            unsigned int pid = ((tag[0] & 0xFFFFFFu) << 8) | (layer[0] & 0xFFu);
            if (mb[POST_ID_W] == pid) {
                mb[TAKEN_W] = pid;
                __threadfence_system();
                posted = 1;
            }
        }
    }
    __syncthreads();
    unsigned long long n_posted = 0;
    if (posted) {
        unsigned int n_ptable = mb[POST_N_TABLE_W];
        for (unsigned int i = t; i < n_ptable; i += blockDim.x) tab[i] = mb[POST_TABLE_AT + i];
        n_posted = mb[POST_N_COPIES_W];
        if (n_posted > MAXP) n_posted = MAXP;
        volatile unsigned long long* pl = reinterpret_cast<volatile unsigned long long*>(mb) + POST_COPIES_AT;
        for (unsigned long long i = t; i < 3 * n_posted; i += blockDim.x) plan[1 + i] = pl[i];
    }
    __threadfence();
    __syncthreads();
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
        for (unsigned long long i = t; i < 3 * n_copies; i += blockDim.x) plan[1 + 3 * n_posted + i] = cl[i];
    }
    if (t == 0) plan[0] = n_posted + n_copies;
    __threadfence();
    __syncthreads();
    for (int i = t; i < N; i += blockDim.x) {
        unsigned int s = tab[ids[i]];
        slots[i] = s == 0xFFFFFFFFu ? 0u : s;
    }
"""

# Copy [(source, destination, bytes)] with every thread of the grid; sources are page-locked
# host memory read over PCIe (uncached loads: a buffer is refilled between requests). The
# kernel passes the slots on (`out`): the expert products take them from here, so they run
# after the copies. MLX's CUDA graphs order kernels by the buffers they read and write; a
# product that only `mx.depends` on the copy's own output may run beside the copy and read
# a slot before its new expert arrives (measured on an H200: wrong tokens from token 0).
# UNROLL loads are issued before their stores (more bytes in flight over PCIe per thread).
# The copy loop alone (the fetch kernel runs it after its plan, fetch_kernels.py): the plan is
# read past the L1 cache, as another block of the same kernel may have just written it.
COPY_LOOP = """
    const unsigned long long* plan_ = reinterpret_cast<const unsigned long long*>(plan);
    unsigned long long count = __ldcg(plan_);
    size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (unsigned long long c = 0; c < count; ++c) {
        unsigned long long from = __ldcg(plan_ + 1 + 3 * c), to = __ldcg(plan_ + 2 + 3 * c), n = __ldcg(plan_ + 3 + 3 * c);
        size_t whole = ((from | to) & 15) == 0 ? n / 16 : 0;
        const uint4* s4 = reinterpret_cast<const uint4*>(from);
        uint4* d4 = reinterpret_cast<uint4*>(to);
        size_t i = tid;
        for (; i + (UNROLL - 1) * stride < whole; i += UNROLL * stride) {
            uint4 v[UNROLL];
            #pragma unroll
            for (int u = 0; u < UNROLL; ++u) v[u] = __ldcv(s4 + i + u * stride);
            #pragma unroll
            for (int u = 0; u < UNROLL; ++u) d4[i + u * stride] = v[u];
        }
        for (; i < whole; i += stride) d4[i] = __ldcv(s4 + i);
        const volatile unsigned char* s1 = reinterpret_cast<const volatile unsigned char*>(from);
        unsigned char* d1 = reinterpret_cast<unsigned char*>(to);
        for (size_t j = whole * 16 + tid; j < n; j += stride) d1[j] = s1[j];
    }
"""
_PULL_COPY = COPY_LOOP + """
    if (tid < N) out[tid] = slots[tid];
"""


def pull_grid() -> tuple:
    """(blocks, threads a block, loads in flight a thread) of the copy kernel;
    CHRONOS_PULL_GRID="BLOCKSxTHREADSxUNROLL" overrides it (scripts/pull_rate.py measures them)."""
    env = os.environ.get("CHRONOS_PULL_GRID")
    if env:
        try:
            blocks, threads, unroll = (int(x) for x in env.lower().split("x"))
        except ValueError:
            raise ValueError(f"CHRONOS_PULL_GRID takes BLOCKSxTHREADSxUNROLL, e.g. 64x256x1, got '{env}'") from None
        return blocks, threads, unroll
    return PULL_BLOCKS, PULL_THREADS, PULL_UNROLL


PULL_BLOCKS, PULL_THREADS, PULL_UNROLL = 64, 256, 1

_kernels: dict = {}


def available() -> bool:
    """MLX's CUDA backend is the default device and can run custom kernels."""
    try:
        return mx.default_device() == mx.gpu and mx.cuda.is_available() and hasattr(mx.fast, "cuda_kernel")
    except AttributeError:
        return False


# `after`: the output of the kernel that must finish first (unread): MLX's CUDA graphs run
# kernels that share no buffer side by side, and two kernels asking at once would race on the
# one mailbox (routers that do not read the hidden state, as the bench's tables, left every
# layer's kernel free to start at once: measured on an H200, requests lost, kernels gave up).
INPUTS = ["ids", "table", "box", "layer", "tag", "guess", "glayer", "after"]


def kernel_source(kind: str) -> str:
    """The body of the `wait` or `pull` kernel with its constants filled in."""
    src = _SOURCE if kind == "wait" else _PULL_SOURCE
    return (src.replace("LIMIT", f"{WAIT_LIMIT_CYCLES}LL").replace("POST_TABLE_AT", str(POST_TABLE_AT))
            .replace("POST_COPIES_AT", str(POST_COPIES_AT)).replace("TABLE_AT", str(TABLE_AT))
            .replace("COPIES_AT", str(COPIES_AT)).replace("GUESSES_AT", str(GUESSES_AT))
            .replace("POST_ID_W", str(POST_ID)).replace("TAKEN_W", str(TAKEN))
            .replace("POST_N_TABLE_W", str(POST_N_TABLE)).replace("POST_N_COPIES_W", str(POST_N_COPIES)))


def _get_kernel(kind: str = "wait"):
    if kind not in _kernels:
        if kind == "wait":
            _kernels[kind] = mx.fast.cuda_kernel(
                name="chronos_wait_for_experts", input_names=INPUTS, output_names=["slots"], source=kernel_source(kind),
            )
        elif kind == "pull":
            _kernels[kind] = mx.fast.cuda_kernel(
                name="chronos_wait_and_plan_pull", input_names=INPUTS, output_names=["slots", "plan"],
                source=kernel_source(kind),
            )
        else:
            _kernels[kind] = mx.fast.cuda_kernel(
                name="chronos_pull_experts", input_names=["plan", "slots"], output_names=["out"], source=_PULL_COPY
            )
    return _kernels[kind]


def max_copies(n_ids: int, n_guesses: int = 0) -> int:
    """How many copies a pulled answer to a request of `n_ids` ids (and `n_guesses` guesses
    for another layer, plus that layer's table) may list (the kernel's plan has room for that
    many): nine tensors an expert, fewer when adjacent ones merge."""
    return min(MAX_COPIES, 16 * (n_ids + n_guesses) + (1 if n_guesses else 0))


def max_post_copies(n_ids: int) -> int:
    """How many copies a post for a layer of `n_ids` ids may list (the pulling kernel's plan
    keeps that much room for one)."""
    return min(MAX_POST_COPIES, 16 * n_ids)


def post_id(tag: int, layer: int) -> int:
    """The mailbox's name for a post to `layer`'s kernel of pass `tag` (as the kernel makes it)."""
    return ((tag & 0xFFFFFF) << 8) | (layer & 0xFF)


def wait_for_experts(ids: mx.array, table: mx.array, box: mx.array, layer: mx.array, tag: mx.array | None = None,
                     always: bool = False, pull: bool = False, guesses: mx.array | None = None,
                     guess_layer: mx.array | None = None, after: mx.array | None = None,
                     posts: bool = False) -> mx.array:
    """Slot ids for `ids` (any shape, at most MAX_IDS), once every one is resident.

    `table`: the layer's wait table; `box`: the mailbox address (uint64[1]); `layer`: the
    layer number and `tag` the pass's number (uint32[1] each: a request names both). `always`
    publishes even when everything is resident (to measure the round trip). `pull`: the host
    answers with the new table and a list of copies (`DevicePull`), which the device makes
    before the slots are used. `guesses` (expert ids of layer `guess_layer`): sent along
    with a request, for the host to load into that layer while this one waits. `after`: an
    array this kernel waits for (the previous layer's slot ids): one kernel asks at a time.
    `posts` (with `pull`): first take a post the host left for this pass and layer, if any."""
    n = ids.size
    if n > MAX_IDS:
        raise ValueError(f"{n} expert ids do not fit the mailbox ({MAX_IDS})")
    flat = ids.reshape(-1)
    if flat.dtype != mx.uint32:
        flat = flat.astype(mx.uint32)
    g = 0 if guesses is None else guesses.size
    if g > MAX_GUESSES:
        raise ValueError(f"{g} guesses do not fit the mailbox ({MAX_GUESSES})")
    guess = guesses.reshape(-1).astype(mx.uint32) if g else layer  # (unread when G is 0)
    inputs = [flat, table, box, layer, layer if tag is None else tag, guess, layer if guess_layer is None else guess_layer,
              layer if after is None else after]
    template = [("N", n), ("ALWAYS", int(always)), ("G", g)]
    if not pull:
        out = _get_kernel("wait")(inputs=inputs, template=template, grid=(1, 1, 1), threadgroup=(1, 1, 1),
                                  output_shapes=[(n,)], output_dtypes=[mx.uint32])[0]
        return out.reshape(ids.shape)
    maxc = max_copies(n, g)
    maxp = max_post_copies(n) if posts else 0
    slots, plan = _get_kernel("pull")(inputs=inputs, template=template + [("MAXC", maxc), ("POSTS", int(posts)),
                                                                          ("MAXP", maxp)],
                                      grid=(128, 1, 1), threadgroup=(128, 1, 1),
                                      output_shapes=[(n,), (1 + 3 * (maxc + maxp),)],
                                      output_dtypes=[mx.uint32, mx.uint64])
    out = pull_copies(plan, slots)
    return out.reshape(ids.shape)


def pull_copies(plan: mx.array, slots: mx.array, grid: tuple | None = None) -> mx.array:
    """Make the copies `plan` lists ([count, (source, destination, bytes) ...], uint64) on the
    device; returns `slots` again (its shape too), after them. `grid`: (blocks, threads, unroll), default `pull_grid()`."""
    blocks, threads, unroll = grid or pull_grid()
    return _get_kernel("copy")(inputs=[plan, slots], template=[("N", slots.size), ("UNROLL", unroll)],
                               grid=(blocks * threads, 1, 1), threadgroup=(threads, 1, 1), output_shapes=[slots.shape],
                               output_dtypes=[mx.uint32])[0]


def ask_in_turn(n_layers: int = 8, chain: bool = True) -> dict:
    """A check of the kernels' ordering on this device (CUDA): `n_layers` waiting kernels whose
    ids are constants (routing that reads no hidden state), evaluated at once, each asking
    for an absent expert; a service thread answers. `chain` passes each the one before it
    (`after`), as `DeviceWaiter.route` does. Returns the layers in the order they asked, whether
    a kernel gave up, and whether every slot came out right."""
    from .cache import _numpy_view
    from .device_wait import MissService

    box = Mailbox.pinned(driver())
    tables = [mx.array(np.full(8, ABSENT, dtype=np.uint32)) for _ in range(n_layers)]
    mx.eval(tables)
    views = [_numpy_view(t) for t in tables]
    asked = []

    def handle(layer, ids, tag):
        asked.append(layer)
        views[layer][ids] = ids + 10

    service = MissService(box, handle)
    t0 = time.perf_counter()
    try:
        outs, after = [], None
        for i in range(n_layers):
            out = wait_for_experts(mx.array([i % 8], dtype=mx.uint32), tables[i], box.box, mx.array([i], dtype=mx.uint32),
                                   after=after if chain else None)
            outs.append(out)
            after = out
        mx.eval(outs)
    finally:
        service.stop()
        gave_up = int(box.words[GAVE_UP]) != 0
        box.close()
    right = [np.array(o).tolist() for o in outs] == [[i % 8 + 10] for i in range(n_layers)]
    return {"asked": asked, "gave_up": gave_up, "slots_right": right, "seconds": time.perf_counter() - t0}


def mapped_words(lib, n: int) -> tuple:
    """(uint32[n] numpy view, device address, free) of page-locked host memory the device
    reads and writes over PCIe (cuMemHostAlloc, PORTABLE | DEVICEMAP)."""
    ptr = ctypes.c_void_p()
    err = lib.cuMemHostAlloc(ctypes.byref(ptr), n * 4, 0x1 | 0x2)
    if err:
        raise OSError(f"CUDA driver: cuMemHostAlloc returned error {err}")
    dptr = ctypes.c_uint64()
    err = lib.cuMemHostGetDevicePointer_v2(ctypes.byref(dptr), ptr, 0)
    if err:
        lib.cuMemFreeHost(ptr)
        raise OSError(f"CUDA driver: cuMemHostGetDevicePointer returned error {err}")
    words = np.ctypeslib.as_array((ctypes.c_uint32 * n).from_address(ptr.value))
    return words, dptr.value, lambda: lib.cuMemFreeHost(ptr)


class Mailbox:
    """WORDS uint32 words that the device and the host both read and write: page-locked
    host memory the device addresses over PCIe (`pinned`), or plain memory for a host
    stand-in of the kernel (tests)."""

    def __init__(self, words: np.ndarray, device_address: int, free=None):
        self.words = words
        self.words[:] = 0
        self.words[POST_ID] = self.words[TAKEN] = NO_POST
        self.device_address = device_address
        self.box = mx.array(np.array([device_address], dtype=np.uint64))
        self._free = free

    @classmethod
    def pinned(cls, lib) -> "Mailbox":
        words, device_address, free = mapped_words(lib, WORDS)
        return cls(words, device_address, free=free)

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

    def post(self, pid: int, table: np.ndarray, copies: list):
        """Leave a post (`post_id`) for one layer's kernel: its new wait table and the copies
        [(source, destination, bytes)] it makes before its experts compute. The words first,
        the id last: a kernel that sees the id sees the rest."""
        if len(table) > MAX_TABLE or len(copies) > MAX_POST_COPIES:
            raise ValueError(f"a post of {len(copies)} copies for {len(table)} experts does not fit the mailbox")
        w = self.words
        w[POST_TABLE_AT : POST_TABLE_AT + len(table)] = table
        w.view(np.uint64)[POST_COPIES_AT : POST_COPIES_AT + 3 * len(copies)] = (
            np.asarray(copies, dtype=np.uint64).reshape(-1))
        w[POST_N_TABLE], w[POST_N_COPIES] = len(table), len(copies)
        w[POST_ID] = pid

    def take_back_post(self, pid: int) -> bool:
        """Withdraw post `pid` (its layer's kernel has passed); whether that kernel took it."""
        w = self.words
        w[POST_ID] = NO_POST
        return int(w[TAKEN]) == pid

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

    def wait(ids, table, box, layer, tag=None, always=False, pull=False, guesses=None, guess_layer=None, after=None,
             posts=False):
        from .cache import _numpy_view

        flat = np.array(ids).reshape(-1).astype(np.uint32)
        words = mailbox.words
        if pull and posts:  # a post for this pass and layer: taken first, as the kernel does
            pid = post_id(int(np.array(layer if tag is None else tag)[0]), int(np.array(layer)[0]))
            if int(words[POST_ID]) == pid:
                words[TAKEN] = pid
                n_table = int(words[POST_N_TABLE])
                n_copies = min(int(words[POST_N_COPIES]), max_post_copies(flat.size))
                _numpy_view(table)[:n_table] = words[POST_TABLE_AT : POST_TABLE_AT + n_table]
                for src, dst, n in words.view(np.uint64)[POST_COPIES_AT : POST_COPIES_AT + 3 * n_copies].reshape(-1, 3).tolist():
                    ctypes.memmove(dst, src, n)
        if always or (np.array(table)[flat] == ABSENT).any():
            seq = (int(words[PUB]) + 1) & 0xFFFFFFFF
            words[LAYER], words[COUNT] = int(np.array(layer)[0]), flat.size
            words[TAG] = int(np.array(layer if tag is None else tag)[0])
            words[IDS : IDS + flat.size] = flat
            g = np.zeros(0, np.uint32) if guesses is None else np.array(guesses).reshape(-1).astype(np.uint32)
            words[GUESS_LAYER] = int(np.array(guess_layer)[0]) if g.size else 0
            words[N_GUESSES] = g.size
            words[GUESSES_AT : GUESSES_AT + g.size] = g
            words[PUB] = seq
            while int(words[ACK]) != seq:
                time.sleep(20e-6)
            if pull:  # the device's part of a pulled load: the new table, then the copies
                # As the kernel: no more copies than its plan has room for.
                n_table = int(words[N_TABLE])
                n_copies = min(int(words[N_COPIES]), max_copies(flat.size, int(words[N_GUESSES])))
                _numpy_view(table)[:n_table] = words[TABLE_AT : TABLE_AT + n_table]
                for src, dst, n in words.view(np.uint64)[COPIES_AT : COPIES_AT + 3 * n_copies].reshape(-1, 3).tolist():
                    ctypes.memmove(dst, src, n)
        slots = np.array(table)[flat]
        return mx.array(np.where(slots == ABSENT, 0, slots).astype(np.uint32).reshape(ids.shape))

    return wait


def driver():
    """libcuda with the calls used here typed (64-bit addresses)."""
    from .upload import _driver

    lib = _driver()
    lib.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    return lib


def pinned_alloc(lib):
    """nbytes -> a page-locked uint8 array the device can read (kept for the process); any
    thread (the service thread allocates its staging: the context is made current first)."""
    from .upload import make_context_current

    def alloc(nbytes: int) -> np.ndarray:
        make_context_current(lib)
        ptr = ctypes.c_void_p()
        err = lib.cuMemHostAlloc(ctypes.byref(ptr), nbytes, 0x1 | 0x2)  # PORTABLE | DEVICEMAP
        if err:
            raise OSError(f"CUDA driver: cuMemHostAlloc returned error {err}")
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr.value))

    return alloc
