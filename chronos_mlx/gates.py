"""Per-layer routing through gates: exact, without stopping graph construction.

Reading a MoE layer's routing back to the host before building its expert products stops
Python at every layer, and the device idles while Python builds the rest. A *gated* layer is
built at once instead: its expert products read their slots through the layer's gate table
(one small device array the host rewrites in place, `ExpertCache.write_gate_table`), and only
the router's ids are started. When the next MoE layer is built, the host reads those ids
(`open_gate`), loads the missing experts and rewrites the table, and only then starts the work
that computes the gated layer's experts. Nothing queued reads the table or a slot while the
host writes it, so the output is stock mlx_lm's; the device waits for the host's decision and
loads, not for graph construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import mlx.core as mx
import numpy as np

from .prefetch import predict, score_prediction, submit_guesses


@dataclass
class Gate:
    """A MoE layer whose experts are built but not yet decided."""

    layer: int
    indices: mx.array  # the router's expert ids, started on the device
    x: mx.array | None = None  # the layer's input (observers, predictors)
    scores: mx.array | None = None  # the predictor's guesses made from it, if any


def close_gate(runtime, layer: int, indices: mx.array, x) -> mx.array:
    """Build `layer` behind a gate: start its router's ids (and the predictor's guesses);
    return its slot ids as the gate table will map them. `runtime.gate` holds it until
    `open_gate`."""
    scores = predict(runtime, layer, x) if runtime.predictor is not None and x is not None else None
    mx.async_eval(indices, *([scores] if scores is not None else []))
    if runtime.cache.deferred:  # the device has work now: inline prefetch reads overlap it
        runtime.cache.run_deferred()
    runtime.gate = Gate(layer, indices, x, scores)
    return runtime.cache.layers[layer].gate_table[indices]


def open_gate(runtime) -> None:
    """Decide the pending gated layer: read its ids, load its missing experts, point its gate
    table at their slots. Must run before anything that computes its experts is evaluated
    (the next layer's routing, or the decode loop after the pass)."""
    if runtime.cache.deferred:  # whatever is still deferred lands before any demand load
        runtime.cache.run_deferred()
    gate = runtime.gate
    if gate is None:
        return
    runtime.gate = None
    layer = gate.layer
    L = runtime.cache.layers[layer]
    # This runs once per MoE layer per token while the device waits: keep it lean.
    t0 = perf_counter()
    host = np.array(gate.indices).reshape(-1)
    runtime.counters.sync_wait_s += perf_counter() - t0
    runtime.layer_syncs += 1
    if not runtime.observers:
        pass
    elif runtime.deferred_observations is not None:  # a decode step that may yet be discarded
        runtime.deferred_observations.append((layer, host, gate.x))
    else:
        runtime._observe(layer, host, gate.x)
    uniq = set(host.tolist())  # a handful of ids: Python sets beat numpy's per-call cost here
    if runtime._predicted:
        score_prediction(runtime, layer, np.fromiter(uniq, np.int64))
    L.counters.hits += host.size - len(uniq)
    slot_of = L.slot_of
    cache = runtime.cache
    if all(slot_of[e] >= 0 for e in uniq):  # mapped means complete, and nothing evicts it meanwhile
        L.counters.hits += len(uniq)
        cache.mark_used(layer, uniq)
        cache.write_gate_table(layer)
    else:
        with cache.one_copy_wait():  # CUDA: the experts' copies and the table's, one stream wait
            runtime.load_for(layer, sorted(uniq))
            cache.mark_used(layer, uniq)
            cache.write_gate_table(layer)
    if gate.scores is not None:
        submit_guesses(runtime, layer, gate.scores)
