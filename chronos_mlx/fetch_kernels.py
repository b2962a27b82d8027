"""The CUDA kernel of device-fetch routing (device_fetch.py), and a host stand-in of it.

In front of each MoE layer's expert products, one thread of the `fetch` kernel looks the
layer's ids up in its wait table. For each absent one it takes a slot itself — a free one,
else the slot of the resident expert with the least decayed use (the `usage` policy's
order; least recently used with `LRU`) that this call does not use — updates the table, the
slot's owner and the use scores, and lists the expert's copies (one a tensor) from the
shards, which are registered with the GPU (page-locked in host memory, device-readable).
The grid-wide copy kernel of device-wait's pulled loads (wait_kernels._PULL_COPY) makes
them and hands the slots on, so the products read them only after their bytes arrived.
No host thread takes part while steps run: the host reads what the kernels did once a
step has run (its per-call counts) and the slots' owners when the generation ends.

Per layer, device arrays: `table` (uint32[E], slot or ABSENT), `owner` (uint32[S], expert or
ABSENT), `score` (float32[E], decayed uses as of `stamp`), `stamp` (uint32[E], the pass of
the last use); `src` (uint64[E*T], each expert's tensors in the registered shards), `dst`
and `nbytes` (uint64[T], slot 0 of each tensor, and an expert's bytes). `tag` is the pass
number: each decode pass calls each layer once, so a stamp equal to it marks this call's
experts, which are never victims.
"""

from __future__ import annotations

import ctypes
import os

import mlx.core as mx
import numpy as np

from .wait_kernels import ABSENT, pull_copies

# counts: experts loaded, experts evicted, and a flag: an id out of range, no slot to take, or
# the plan too small (the call's rows are then not exact; the decode loop refuses the step).
N_COUNTS = 3

# The layer's arrays, written in place (MLX passes inputs as const), the pass and the decay rate.
_STATE = """
    unsigned int* tab = const_cast<unsigned int*>(table);
    unsigned int* own = const_cast<unsigned int*>(owner);
    float* sc = const_cast<float*>(score);
    unsigned int* st = const_cast<unsigned int*>(stamp);
    const unsigned int now = tag[0];
    const float inv_half = 1.0f / (float)HALF;
"""

# Expert `e` into slot `best`: its old owner out of the table, the copies listed.
_TAKE = """
        unsigned int old = own[best];
        if (old != 0xFFFFFFFFu) { tab[old] = 0xFFFFFFFFu; ++evicted; }
        own[best] = e;
        tab[e] = (unsigned int)best;
        ++loads;
        for (int q = 0; q < T; ++q) {
            plan[1 + 3 * n_copies] = src[(unsigned long long)e * T + q];
            plan[2 + 3 * n_copies] = dst[q] + (unsigned long long)best * nbytes[q];
            plan[3 + 3 * n_copies] = nbytes[q];
            ++n_copies;
        }
"""

_FETCH_SOURCE = _STATE + """
    unsigned long long n_copies = 0;
    unsigned int loads = 0, evicted = 0, failed = 0;
    for (int i = 0; i < N; ++i) {  // this call's uses: decayed to now, plus one (once an expert)
        unsigned int e = ids[i];
        if (e >= (unsigned int)E) { failed = 1; continue; }
        if (st[e] != now) {
            sc[e] = sc[e] * exp2f(-(float)(now - st[e]) * inv_half) + 1.0f;
            st[e] = now;
        }
    }
    for (int i = 0; i < N; ++i) {
        unsigned int e = ids[i];
        if (e >= (unsigned int)E || tab[e] != 0xFFFFFFFFu) continue;
        int best = -1;
        float best_key = 0.0f;
        unsigned int best_age = 0u, best_x = 0u;
        for (int s = 0; s < S; ++s) {
            unsigned int x = own[s];
            if (x == 0xFFFFFFFFu) { best = s; break; }  // a free slot first
            if (st[x] == now) continue;  // used by this call: never a victim
            unsigned int age = now - st[x];
            float key = LRU ? 0.0f : sc[x] * exp2f(-(float)age * inv_half);
            if (best < 0 || key < best_key || (key == best_key && (age > best_age || (age == best_age && x < best_x)))) {
                best = s; best_key = key; best_age = age; best_x = x;
            }
        }
        if (best < 0 || n_copies + T > MAXC) { failed = 1; continue; }
""" + _TAKE + """    }
    plan[0] = n_copies;
    for (int i = 0; i < N; ++i) {
        unsigned int s = ids[i] < (unsigned int)E ? tab[ids[i]] : 0xFFFFFFFFu;
        slots[i] = s == 0xFFFFFFFFu ? 0u : s;
    }
    counts[0] = loads;
    counts[1] = evicted;
    counts[2] = failed;
"""

# The same decisions made by a block of THREADS threads (a power of two): each absent expert's
# victim search reads every slot's owner, stamp and score — on one thread ~3 dependent global
# loads a slot, tens of microseconds a miss at 64 slots — so here each thread takes some slots
# and a tree reduction picks the winner by the same order (free slots first, lowest index; then
# least decayed use, oldest, lowest expert id). Uses are stamped one id a thread; the absent ids
# are listed (in call order, once each) and their slots taken one after another by thread 0.
_FETCH_WIDE_SOURCE = _STATE + """
    const int t = threadIdx.x;
    __shared__ unsigned int absent[N];
    __shared__ int n_absent;
    __shared__ unsigned int failed;
    __shared__ unsigned int r_cls[THREADS], r_age[THREADS], r_x[THREADS], r_s[THREADS];
    __shared__ float r_key[THREADS];
    if (t == 0) { n_absent = 0; failed = 0u; }
    __syncthreads();
    for (int i = t; i < N; i += THREADS) {  // this call's uses, once an expert
        unsigned int e = ids[i];
        bool first = true;
        for (int j = 0; j < i; ++j) if (ids[j] == e) { first = false; break; }
        if (e >= (unsigned int)E) atomicOr(&failed, 1u);
        else if (first && st[e] != now) {
            sc[e] = sc[e] * exp2f(-(float)(now - st[e]) * inv_half) + 1.0f;
            st[e] = now;
        }
    }
    __syncthreads();
    if (t == 0) {
        for (int i = 0; i < N; ++i) {
            unsigned int e = ids[i];
            if (e >= (unsigned int)E || tab[e] != 0xFFFFFFFFu) continue;
            bool seen = false;
            for (int j = 0; j < n_absent; ++j) if (absent[j] == e) { seen = true; break; }
            if (!seen) absent[n_absent++] = e;
        }
    }
    __syncthreads();
    unsigned long long n_copies = 0;
    unsigned int loads = 0u, evicted = 0u;
    for (int a = 0; a < n_absent; ++a) {
        // Class 0: free; 1: a candidate victim; 2: used by this call; 3: none seen.
        unsigned int bc = 3u, ba = 0u, bx = 0u, bs = 0xFFFFFFFFu;
        float bk = 0.0f;
        for (int s = t; s < S; s += THREADS) {
            unsigned int x = own[s], c = 1u, age = 0u;
            float k = 0.0f;
            if (x == 0xFFFFFFFFu) { c = 0u; x = 0u; }
            else if (st[x] == now) { c = 2u; }
            else { age = now - st[x]; k = LRU ? 0.0f : sc[x] * exp2f(-(float)age * inv_half); }
            if (c < bc || (c == bc && (k < bk || (k == bk && (age > ba || (age == ba && (x < bx || (x == bx && (unsigned int)s < bs)))))))) {
                bc = c; bk = k; ba = age; bx = x; bs = (unsigned int)s;
            }
        }
        r_cls[t] = bc; r_key[t] = bk; r_age[t] = ba; r_x[t] = bx; r_s[t] = bs;
        __syncthreads();
        for (int w = THREADS / 2; w > 0; w >>= 1) {
            if (t < w) {
                unsigned int c = r_cls[t + w], age = r_age[t + w], x = r_x[t + w], s = r_s[t + w];
                float k = r_key[t + w];
                if (c < r_cls[t] || (c == r_cls[t] && (k < r_key[t] || (k == r_key[t] && (age > r_age[t] ||
                    (age == r_age[t] && (x < r_x[t] || (x == r_x[t] && s < r_s[t])))))))) {
                    r_cls[t] = c; r_key[t] = k; r_age[t] = age; r_x[t] = x; r_s[t] = s;
                }
            }
            __syncthreads();
        }
        if (t == 0) {
            unsigned int e = absent[a];
            if (r_cls[0] >= 2u || n_copies + T > MAXC) {
                failed = 1u;
            } else {
                unsigned int best = r_s[0];
""" + _TAKE + """            }
        }
        __syncthreads();
    }
    for (int i = t; i < N; i += THREADS) {
        unsigned int s = ids[i] < (unsigned int)E ? tab[ids[i]] : 0xFFFFFFFFu;
        slots[i] = s == 0xFFFFFFFFu ? 0u : s;
    }
    if (t == 0) {
        plan[0] = n_copies;
        counts[0] = loads;
        counts[1] = evicted;
        counts[2] = failed;
    }
"""

INPUTS = ["ids", "table", "owner", "score", "stamp", "src", "dst", "nbytes", "tag", "after"]
OUTPUTS = ["slots", "plan", "counts"]

_kernels: dict = {}


def fetch_threads() -> int:
    """Threads of the fetch kernel: 1 (the default, measured on an H200) or a power of two up to
    1024 for the block-wide victim search (`CHRONOS_FETCH_THREADS`; not yet measured on a GPU)."""
    env = os.environ.get("CHRONOS_FETCH_THREADS", "1")
    try:
        n = int(env)
    except ValueError:
        n = 0
    if n < 1 or n > 1024 or n & (n - 1):
        raise ValueError(f"CHRONOS_FETCH_THREADS takes a power of two from 1 to 1024, got '{env}'")
    return n


def kernel_source(threads: int = 1) -> str:
    return _FETCH_SOURCE if threads == 1 else _FETCH_WIDE_SOURCE


def _get_kernel(threads: int):
    wide = threads > 1
    if wide not in _kernels:
        _kernels[wide] = mx.fast.cuda_kernel(name="chronos_fetch_experts_wide" if wide else "chronos_fetch_experts",
                                             input_names=INPUTS, output_names=OUTPUTS, source=kernel_source(threads))
    return _kernels[wide]


def fetch_experts(ids: mx.array, state: dict, tag: mx.array, after: mx.array | None = None,
                  half_life: int = 32, lru: bool = False, threads: int | None = None) -> tuple:
    """(slot ids shaped as `ids`, counts uint32[N_COUNTS]) once every id is resident in the
    layer whose device arrays `state` holds (table, owner, score, stamp, src, dst, nbytes):
    the plan kernel decides and lists copies, the copy kernel makes them. `threads`: the plan
    kernel's (default `fetch_threads()`)."""
    threads = threads or fetch_threads()
    n = ids.size
    flat = ids.reshape(-1)
    if flat.dtype != mx.uint32:
        flat = flat.astype(mx.uint32)
    T = state["dst"].size
    maxc = n * T
    inputs = [flat, state["table"], state["owner"], state["score"], state["stamp"], state["src"], state["dst"],
              state["nbytes"], tag, tag if after is None else after]
    template = [("N", n), ("S", state["owner"].size), ("E", state["table"].size), ("T", T), ("LRU", int(lru)),
                ("HALF", max(1, int(half_life))), ("MAXC", maxc)] + ([("THREADS", threads)] if threads > 1 else [])
    slots, plan, counts = _get_kernel(threads)(inputs=inputs, template=template, grid=(threads, 1, 1),
                                               threadgroup=(threads, 1, 1),
                                        output_shapes=[(n,), (1 + 3 * maxc,), (N_COUNTS,)],
                                        output_dtypes=[mx.uint32, mx.uint64, mx.uint32])
    out = pull_copies(plan, slots)
    return out.reshape(ids.shape), counts


def host_fetch(ids: mx.array, state: dict, tag: mx.array, after=None, half_life: int = 32, lru: bool = False,
               threads=None) -> tuple:
    """`fetch_experts` done by the host, for backends without the kernel (tests): the same
    decisions on numpy views of the same arrays (either kernel's: they decide alike), the
    copies made with memmove (the shards' registered addresses are host addresses there)."""
    from .cache import _numpy_view

    flat = np.array(ids).reshape(-1).astype(np.int64)
    tab, own = _numpy_view(state["table"]), _numpy_view(state["owner"])
    sc, st = _numpy_view(state["score"]), _numpy_view(state["stamp"])
    src, dst, nbytes = (np.array(state[k]) for k in ("src", "dst", "nbytes"))
    E, S, T = tab.size, own.size, dst.size
    now = int(np.array(tag)[0])
    inv_half = np.float32(1.0 / max(1, int(half_life)))

    def decayed(x: int, age: int) -> np.float32:  # float32 arithmetic, as on the device
        return np.float32(sc[x]) * np.float32(np.exp2(np.float32(-np.float32(age) * inv_half)))

    loads = evicted = failed = 0
    for e in flat.tolist():
        if e >= E:
            failed = 1
        elif int(st[e]) != now:
            sc[e] = decayed(e, (now - int(st[e])) & 0xFFFFFFFF) + np.float32(1.0)
            st[e] = now
    for e in flat.tolist():
        if e >= E or tab[e] != ABSENT:
            continue
        best, best_key = -1, None
        for s in range(S):
            x = int(own[s])
            if x == ABSENT:
                best = s
                break
            if int(st[x]) == now:
                continue
            age = (now - int(st[x])) & 0xFFFFFFFF
            key = (np.float32(0.0) if lru else decayed(x, age), -age, x)
            if best < 0 or key < best_key:
                best, best_key = s, key
        if best < 0:
            failed = 1
            continue
        old = int(own[best])
        if old != ABSENT:
            tab[old] = ABSENT
            evicted += 1
        own[best], tab[e] = e, best
        loads += 1
        for t in range(T):
            ctypes.memmove(int(dst[t]) + best * int(nbytes[t]), int(src[e * T + t]), int(nbytes[t]))
    slots = tab[np.minimum(flat, E - 1)]
    slots = np.where((slots == ABSENT) | (flat >= E), 0, slots).astype(np.uint32)
    return (mx.array(slots.reshape(ids.shape)),
            mx.array(np.array([loads, evicted, failed], dtype=np.uint32)))
