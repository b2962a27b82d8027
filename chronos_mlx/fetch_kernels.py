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

import mlx.core as mx
import numpy as np

from .wait_kernels import ABSENT, pull_copies

# counts: experts loaded, experts evicted, and a flag: an id out of range, no slot to take, or
# the plan too small (the call's rows are then not exact; the decode loop refuses the step).
N_COUNTS = 3

_FETCH_SOURCE = """
    unsigned int* tab = const_cast<unsigned int*>(table);
    unsigned int* own = const_cast<unsigned int*>(owner);
    float* sc = const_cast<float*>(score);
    unsigned int* st = const_cast<unsigned int*>(stamp);
    const unsigned int now = tag[0];
    const float inv_half = 1.0f / (float)HALF;
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
        unsigned int old = own[best];
        if (old != 0xFFFFFFFFu) { tab[old] = 0xFFFFFFFFu; ++evicted; }
        own[best] = e;
        tab[e] = (unsigned int)best;
        ++loads;
        for (int t = 0; t < T; ++t) {
            plan[1 + 3 * n_copies] = src[(unsigned long long)e * T + t];
            plan[2 + 3 * n_copies] = dst[t] + (unsigned long long)best * nbytes[t];
            plan[3 + 3 * n_copies] = nbytes[t];
            ++n_copies;
        }
    }
    plan[0] = n_copies;
    for (int i = 0; i < N; ++i) {
        unsigned int s = ids[i] < (unsigned int)E ? tab[ids[i]] : 0xFFFFFFFFu;
        slots[i] = s == 0xFFFFFFFFu ? 0u : s;
    }
    counts[0] = loads;
    counts[1] = evicted;
    counts[2] = failed;
"""

INPUTS = ["ids", "table", "owner", "score", "stamp", "src", "dst", "nbytes", "tag", "after"]
OUTPUTS = ["slots", "plan", "counts"]

_kernel = None


def kernel_source() -> str:
    return _FETCH_SOURCE


def _get_kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="chronos_fetch_experts", input_names=INPUTS, output_names=OUTPUTS,
                                      source=_FETCH_SOURCE)
    return _kernel


def fetch_experts(ids: mx.array, state: dict, tag: mx.array, after: mx.array | None = None,
                  half_life: int = 32, lru: bool = False) -> tuple:
    """(slot ids shaped as `ids`, counts uint32[N_COUNTS]) once every id is resident in the
    layer whose device arrays `state` holds (table, owner, score, stamp, src, dst, nbytes):
    the plan kernel decides and lists copies, the copy kernel makes them."""
    n = ids.size
    flat = ids.reshape(-1)
    if flat.dtype != mx.uint32:
        flat = flat.astype(mx.uint32)
    T = state["dst"].size
    maxc = n * T
    inputs = [flat, state["table"], state["owner"], state["score"], state["stamp"], state["src"], state["dst"],
              state["nbytes"], tag, tag if after is None else after]
    template = [("N", n), ("S", state["owner"].size), ("E", state["table"].size), ("T", T), ("LRU", int(lru)),
                ("HALF", max(1, int(half_life))), ("MAXC", maxc)]
    slots, plan, counts = _get_kernel()(inputs=inputs, template=template, grid=(1, 1, 1), threadgroup=(1, 1, 1),
                                        output_shapes=[(n,), (1 + 3 * maxc,), (N_COUNTS,)],
                                        output_dtypes=[mx.uint32, mx.uint64, mx.uint32])
    out = pull_copies(plan, slots)
    return out.reshape(ids.shape), counts


def host_fetch(ids: mx.array, state: dict, tag: mx.array, after=None, half_life: int = 32, lru: bool = False) -> tuple:
    """`fetch_experts` done by the host, for backends without the kernel (tests): the same
    decisions on numpy views of the same arrays, the copies made with memmove (the shards'
    registered addresses are host addresses there)."""
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
