"""The CUDA kernel of device-fetch routing (device_fetch.py), and a host stand-in of it.

In front of each MoE layer's expert products, the `fetch` kernel (one warp) looks the
layer's ids up in the layer's table, a thread an id, and counts their uses; its first thread
then takes a slot for each absent one — a free one, else the slot of the resident expert
with the least decayed use (the `usage` policy's order; least recently used with `LRU`) that
this call does not use — updates the table, the slot's owner, and lists the expert's copies
(one a tensor) from the shards, which are registered with the GPU (page-locked in host
memory, device-readable); the call's ids and counts go to the layer's row of a journal in
page-locked host memory. Device-wait's grid-wide copy kernel (wait_kernels.pull_copies)
makes the copies and hands the slots on, so the products read them only once every copy
arrived. No host thread takes part while steps run: the host reads the journal once a step
has run, and the slots' owners when the generation ends.

The same kernel with `guess` prefetches a predictor's guesses for the next layer: absent
guesses take slots that hold no other guess, no use is counted (a wrong guess is the next
victim), and its row in a second journal lists what it loaded.

Two graph nodes a layer and no reshapes or per-step concatenation: on the H200 the host's
work to build and launch a q48 step, or the GPU's chain of small kernels, paces the decode
(docs/device_fetch.md), so every node a layer, and every dependent load of a lone thread, costs.

Per layer, device arrays: `table` (uint32[E], slot or ABSENT), `owner` (uint32[S], expert or
ABSENT), `score` (float32[E], decayed uses as of `stamp`), `stamp` (uint32[E], the pass of
the last use); `src` (uint64[E*T], each expert's tensors in the registered shards), `dst`
and `nbytes` (uint64[T], slot 0 of each tensor, and an expert's bytes); `journal` and
`prefetch_journal` (uint64[1], the addresses of the layer's journal rows). `tag` is the pass
number: each decode pass calls each layer once, so a stamp equal to it marks this call's
experts, which are never victims.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np

from .wait_kernels import ABSENT, mapped_words, pull_copies, pull_grid

# A journal row: the pass, experts loaded, experts evicted, a flag (an id out of range or no
# slot to take: the call's rows are then not exact, and the decode loop refuses the step),
# the number of ids, then the ids. JOURNAL_SETS rows a layer, by pass number: the decode loop
# reads a pass before the one two after it starts.
HEAD, N_COUNTS, JOURNAL_SETS = 5, 3, 4

# One warp a call: the loads of the call's ids, their uses and their slots are made by a thread
# an id (a lone thread's chain of dependent loads cost ~28 us a layer on the H200, on the
# step's critical path); the slots of absent ones are taken in order by the first thread.
THREADS = 32

_SOURCE = """
    unsigned int* tab = const_cast<unsigned int*>(table);
    unsigned int* own = const_cast<unsigned int*>(owner);
    float* sc = const_cast<float*>(score);
    unsigned int* st = const_cast<unsigned int*>(stamp);
    const unsigned int now = tag[0];
    const int t = threadIdx.x;
    const float inv_half = 1.0f / (float)HALF;
    unsigned int* row = reinterpret_cast<unsigned int*>(journal[0]) + (now % JSETS) * JW;
    __shared__ unsigned int e_of[N];
    __shared__ unsigned int absent[N];
    for (int i = t; i < N; i += blockDim.x) e_of[i] = ids[i];
    __syncthreads();
    for (int i = t; i < N; i += blockDim.x) {  // this call's uses: decayed to now, plus one (once an expert)
        unsigned int e = e_of[i];
        bool again = false;  // an expert listed twice counts once, by its first listing
        for (int j = 0; j < i && !again; ++j) again = e_of[j] == e;
        absent[i] = e < (unsigned int)E && tab[e] == 0xFFFFFFFFu;
        if (!GUESS && !again && e < (unsigned int)E && st[e] != now) {
            sc[e] = sc[e] * exp2f(-(float)(now - st[e]) * inv_half) + 1.0f;
            st[e] = now;
        }
    }
    __syncthreads();
    if (t == 0) {
        unsigned long long n_copies = 0;
        unsigned int loads = 0, evicted = 0, failed = 0;
        for (int i = 0; i < N; ++i) {
            unsigned int e = e_of[i];
            if (e >= (unsigned int)E) { failed = GUESS ? failed : 1u; continue; }
            if (!absent[i] || tab[e] != 0xFFFFFFFFu) continue;  // resident (or loaded for an earlier listing)
            int best = -1;
            float best_key = 0.0f;
            unsigned int best_age = 0u, best_x = 0u;
            for (int s = 0; s < S; ++s) {
                unsigned int x = own[s];
                if (x == 0xFFFFFFFFu) { best = s; break; }  // a free slot first
                if (st[x] == now) continue;  // used by this call: never a victim
                if (GUESS) {  // guesses are not uses: the call's own ids are kept by looking
                    bool mine = false;
                    for (int j = 0; j < N && !mine; ++j) mine = e_of[j] == x;
                    if (mine) continue;
                }
                unsigned int age = now - st[x];
                float key = LRU ? 0.0f : sc[x] * exp2f(-(float)age * inv_half);
                if (best < 0 || key < best_key || (key == best_key && (age > best_age || (age == best_age && x < best_x)))) {
                    best = s; best_key = key; best_age = age; best_x = x;
                }
            }
            if (best < 0 || n_copies + T > MAXC) { failed = GUESS ? failed : 1u; continue; }  // a guess may not fit
            unsigned int old = own[best];
            if (old != 0xFFFFFFFFu) { tab[old] = 0xFFFFFFFFu; ++evicted; }
            own[best] = e;
            tab[e] = (unsigned int)best;
            if (GUESS) row[HEAD + loads] = e;  // a guess's row lists what it loaded
            ++loads;
            for (int q = 0; q < T; ++q) {
                plan[1 + 3 * n_copies] = src[(unsigned long long)e * T + q];
                plan[2 + 3 * n_copies] = dst[q] + (unsigned long long)best * nbytes[q];
                plan[3 + 3 * n_copies] = nbytes[q];
                ++n_copies;
            }
        }
        plan[0] = n_copies;
        row[0] = now; row[1] = loads; row[2] = evicted; row[3] = failed; row[4] = GUESS ? loads : (unsigned int)N;
    }
    __syncthreads();  // the first thread's tables are seen by every thread of the block
    for (int i = t; i < N; i += blockDim.x) {
        unsigned int e = e_of[i];
        unsigned int s = e < (unsigned int)E ? tab[e] : 0xFFFFFFFFu;
        slots[i] = s == 0xFFFFFFFFu ? 0u : s;
        if (!GUESS) row[HEAD + i] = e;
    }
""".replace("HEAD", str(HEAD))

INPUTS = ["ids", "table", "owner", "score", "stamp", "src", "dst", "nbytes", "journal", "tag", "after"]
OUTPUTS = ["slots", "plan"]

_kernels: dict = {}


class Journal:
    """What each layer's fetch calls did, for the host to read once a step has run: JOURNAL_SETS
    rows a layer (by pass number) of HEAD words and up to `capacity` ids. Page-locked host
    memory the device writes over PCIe with `lib` (libcuda); plain memory for the stand-in."""

    def __init__(self, layers: int, capacity: int, lib=None):
        self.capacity = capacity
        self.width = HEAD + capacity
        words = max(1, layers) * JOURNAL_SETS * self.width
        self._free = None
        if lib is None:
            memory = np.zeros(words, dtype=np.uint32)
            self.device_address = memory.ctypes.data
        else:
            from .upload import make_context_current

            make_context_current(lib)
            memory, self.device_address, self._free = mapped_words(lib, words)
            memory[:] = 0
        self.rows = memory.reshape(max(1, layers), JOURNAL_SETS, self.width)

    def address(self, layer: int) -> mx.array:
        """The device address of `layer`'s rows (the kernel's `journal` input)."""
        return mx.array(np.array([self.device_address + layer * JOURNAL_SETS * self.width * 4], dtype=np.uint64))

    def read_pass(self, layers, tag: int) -> np.ndarray:
        """A copy of the rows of `layers` for pass `tag` (one numpy gather a step: the host's
        work a step is the decode's pace on a GPU); check each row's pass (column 0) against `tag`."""
        return self.rows[np.asarray(layers, dtype=np.intp), tag % JOURNAL_SETS]

    def read(self, layer: int, tag: int) -> tuple:
        """(ids, [loaded, evicted, failed]) of `layer`'s call in pass `tag`, or None if its row
        holds another pass (overwritten, or never written)."""
        row = self.rows[layer, tag % JOURNAL_SETS]
        if int(row[0]) != tag & 0xFFFFFFFF:
            return None
        return row[HEAD : HEAD + int(row[4])].copy(), row[1:HEAD - 1].tolist()

    def close(self):
        free, self._free = self._free, None
        if free is not None:
            free()


def _get_kernel():
    if "fetch" not in _kernels:
        _kernels["fetch"] = mx.fast.cuda_kernel(name="chronos_fetch_experts", input_names=INPUTS,
                                                output_names=OUTPUTS, source=_SOURCE)
    return _kernels["fetch"]


def _launch(state: dict, n: int, half_life: int, lru: bool, guess: bool = False) -> tuple:
    """(template, plan shape, copy grid) of a call of `n` ids on this layer, made once (this
    runs for every MoE layer of every step, where the host's time is the decode's pace)."""
    calls = state.setdefault("calls", {})
    key = (n, half_life, lru, guess)
    if key not in calls:
        T = state["dst"].size
        maxc = n * T
        template = [("N", n), ("S", state["owner"].size), ("E", state["table"].size), ("T", T), ("LRU", int(lru)),
                    ("HALF", max(1, int(half_life))), ("MAXC", maxc), ("JW", state["journal_width"]),
                    ("JSETS", JOURNAL_SETS), ("GUESS", int(guess))]
        calls[key] = (template, (1 + 3 * maxc,), pull_grid())
    return calls[key]


def fetch_experts(ids: mx.array, state: dict, tag: mx.array, after: mx.array | None = None,
                  half_life: int = 32, lru: bool = False, guess: bool = False) -> mx.array:
    """Slot ids shaped as `ids`, once every id is resident in the layer whose device arrays
    `state` holds (table, owner, score, stamp, src, dst, nbytes, journal): the fetch kernel
    decides and writes the call's ids and counts to the layer's journal row, the copy kernel
    copies.

    `guess`: `ids` are guesses for the layer (a prefetch): absent ones are loaded where a slot
    not holding another guess can be taken, none counts as a use, and the row written (to
    `state["prefetch_journal"]`) lists the experts loaded. Nothing reads the slots it returns
    but the layer's own call, which takes them as `after`."""
    n = ids.size
    if n > state["journal_width"] - HEAD:
        raise ValueError(f"{n} expert ids in one call do not fit device-fetch's journal ({state['journal_width'] - HEAD})")
    if ids.dtype != mx.uint32:
        ids = ids.astype(mx.uint32)
    template, plan_shape, grid = _launch(state, n, half_life, lru, guess)
    inputs = [ids, state["table"], state["owner"], state["score"], state["stamp"], state["src"], state["dst"],
              state["nbytes"], state["prefetch_journal" if guess else "journal"], tag, tag if after is None else after]
    slots, plan = _get_kernel()(inputs=inputs, template=template, grid=(THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                                output_shapes=[ids.shape, plan_shape], output_dtypes=[mx.uint32, mx.uint64])
    return pull_copies(plan, slots, grid)


def host_fetch(ids: mx.array, state: dict, tag: mx.array, after=None, half_life: int = 32,
               lru: bool = False, guess: bool = False) -> mx.array:
    """`fetch_experts` done by the host, for backends without the kernel (tests): the same
    decisions on numpy views of the same arrays, the copies made with memmove (the shards'
    registered addresses are host addresses there), the journal row written alike."""
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
    loaded = []
    mine = set(flat.tolist()) if guess else set()
    for e in [] if guess else flat.tolist():
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
            if int(st[x]) == now or x in mine:
                continue
            age = (now - int(st[x])) & 0xFFFFFFFF
            key = (np.float32(0.0) if lru else decayed(x, age), -age, x)
            if best < 0 or key < best_key:
                best, best_key = s, key
        if best < 0:
            failed = failed if guess else 1
            continue
        old = int(own[best])
        if old != ABSENT:
            tab[old] = ABSENT
            evicted += 1
        own[best], tab[e] = e, best
        loads += 1
        loaded.append(e)
        for t in range(T):
            ctypes.memmove(int(dst[t]) + best * int(nbytes[t]), int(src[e * T + t]), int(nbytes[t]))
    slots = tab[np.minimum(flat, E - 1)]
    slots = np.where((slots == ABSENT) | (flat >= E), 0, slots).astype(np.uint32)
    width = state["journal_width"]
    address = int(np.array(state["prefetch_journal" if guess else "journal"])[0]) + (now % JOURNAL_SETS) * width * 4
    row = np.ctypeslib.as_array((ctypes.c_uint32 * width).from_address(address))
    listed = np.array(loaded, dtype=np.int64) if guess else flat
    row[HEAD : HEAD + listed.size] = listed
    row[:HEAD] = [now, loads, evicted, failed, listed.size]
    return mx.array(slots.reshape(ids.shape))
