"""Per-layer routing with late rows: compute a MoE layer at once, fix only the rows that missed.

A gated layer (gates.py) waits for the host before any of its experts compute: the device
idles from the moment the router's ids are ready until the host has read them, loaded what
is missing and started the layer again. Here the layer's expert products start at once on
the experts resident when the layer is built (the slot map snapshot `LayerSlots.table`; an
absent expert points at some slot and computes a garbage row). While the device computes
them, the host reads the ids, loads the missing experts and recomputes only the rows whose
expert was absent from the snapshot, then puts those rows in place of the garbage ones.

Exact: each output row of `gather_qmm` / `gather_mm` depends on its own expert alone, the
resident rows read slots no load may take (victims are never among the layer's experts),
and the recomputed rows go through the kernel stock's whole call uses (padded where the
backend picks kernels by row count: kernel_match.py), as waves do. The weighted sum over
rows stays in mlx_lm's code, after the rows are final. A garbage row may read a slot while
a load writes it; it is dropped, never combined with anything.

Measured on MLX's CPU backend (demo, 2 cores): 0.92x of stock at 0.5 against 0.83x gated,
1.06x at 63/64 against 0.93x (docs/benchmarks.md, session 19). Functions of a Runtime's
state, like gates.py.
"""

from __future__ import annotations

from time import perf_counter

import mlx.core as mx
import numpy as np

from .prefetch import predict, score_prediction, submit_guesses

# Stock mlx_lm sorts a call's rows by expert from this many on (SwitchGLU); such calls
# (prefill) take the other paths.
_SORTED_FROM = 64


def applies(runtime, layer: int, indices: mx.array) -> bool:
    """Whether this call of `layer` is computed with late rows: per-layer routing with
    `runtime.late_rows`, a call small enough to need no waves nor sorting (decode steps),
    and a layer that can miss (or is watched: observers see every decision)."""
    if not runtime.late_rows or runtime.mode != "sync" or indices.size >= _SORTED_FROM:
        return False
    L = runtime.cache.layers[layer]
    if indices.size > L.num_slots:
        return False
    L.refresh()
    return not L.full or bool(runtime.observers)


def compute(runtime, switch, layer: int, x: mx.array, indices: mx.array) -> mx.array:
    """The expert rows of `switch` (a StreamingSwitch) for `indices`, shaped as its call
    returns them, every row exact. Call only where `applies`."""
    cache = runtime.cache
    L = cache.layers[layer]
    runtime.open_gate()  # nothing may stay gated behind this layer (none is, in this mode)
    snapshot = L.table_map  # what the slot ids below map: absent experts compute garbage rows
    scores = predict(runtime, layer, x) if runtime.predictor is not None else None
    mx.async_eval(indices, *([scores] if scores is not None else []))
    xe = mx.expand_dims(x, (-2, -3))
    y = switch._experts(xe, L.table[indices], indices.size)
    mx.async_eval(y)  # computes while the host reads the ids and loads
    if cache.deferred:  # inline prefetch reads overlap it too
        cache.run_deferred()
    t0 = perf_counter()
    host = np.array(indices).reshape(-1)
    runtime.counters.sync_wait_s += perf_counter() - t0
    runtime.layer_syncs += 1
    if runtime.deferred_observations is not None:  # a decode step that may yet be discarded
        runtime.deferred_observations.append((layer, host, x))
    elif runtime.observers:
        runtime._observe(layer, host, x)
    uniq = set(host.tolist())  # a handful of ids: Python sets beat numpy's per-call cost here
    if runtime._predicted:
        score_prediction(runtime, layer, np.fromiter(uniq, np.int64))
    L.counters.hits += host.size - len(uniq)
    # Rows are wrong where the snapshot lacked the expert, even if a prefetch has landed it since.
    stale = {e for e in uniq if snapshot[e] < 0}
    if not stale:
        L.counters.hits += len(uniq)
        cache.mark_used(layer, uniq)
        _prefetch(runtime, layer, scores)
        return y.squeeze(-2)
    with cache.one_copy_wait():  # CUDA: the experts' copies, one stream wait
        runtime.load_for(layer, sorted(uniq))
    cache.mark_used(layer, uniq)
    _prefetch(runtime, layer, scores)  # after mark_used: guesses never evict this layer's experts
    # Plain Python on a handful of rows: right after compute each numpy call runs cold (a
    # fancy index of the slot map alone measured ~80 us here).
    ids = host.tolist()
    rows = [i for i, e in enumerate(ids) if e in stale]
    runtime.counters.recomputed_rows += len(rows)
    slot_of, M, n = L.slot_of, indices.shape[-1], len(ids)
    slots = [int(slot_of[ids[i]]) for i in rows]
    fixed = switch._padded_experts(xe.flatten(0, -3)[mx.array([i // M for i in rows], dtype=mx.uint32)], slots,
                                   indices.size)
    # Row i of the result: computed row i, or its recomputation (appended after all of them).
    take = list(range(n))
    for j, i in enumerate(rows):
        take[i] = n + j
    flat = mx.concatenate([y.reshape(n, *y.shape[-2:]), fixed], axis=0)[mx.array(take, dtype=mx.uint32)]
    return mx.unflatten(flat, 0, indices.shape).squeeze(-2)


def _prefetch(runtime, layer: int, scores):
    """The predictor's guesses for the next layers, read now where reads are inline: the
    device is still computing this layer's rows, and a guess must land before the next layer
    takes its slot map to spare a recomputed row (a later read only spares the read)."""
    submit_guesses(runtime, layer, scores)
    if runtime.cache.deferred:
        runtime.cache.run_deferred()

