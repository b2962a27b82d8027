"""How a MoE layer's expert ids become slot ids: the routing behaviour of a `Runtime`.

Two ways to route a MoE layer:
- "sync" (per layer): the layer's experts are computed only after the host has read the
  router's indices and loaded what is missing. Through a gate (gates.py) by default: the
  layer is built at once and decided when the next one is built, so graph construction
  does not stop; a batch with more indices than slots is decided on the spot (waves).
  Exact under any caller, including plain `mlx_lm.generate`; costs one host round trip
  per MoE layer whose experts are not all resident.
- "optimistic": remap the indices through the device-side expert->slot table and record
  them (`Runtime.recording`); at segment ends (verification.py) and after the step, the
  decode loop in `generate.py` reads them back and recomputes from a layer that missed.
  Layers whose experts are all resident never need either.
- "device-wait" (CUDA): the ids go through a kernel that waits on the device for a thread
  to load what is missing (device_wait.py); the host reads the step's routing once, after it ran.

Functions of the runtime's state, like gates.py and prefetch.py; `Runtime` keeps the state
and forwards `route`, `load_for` and `account_step` here.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from .cache import id_list
from .gates import close_gate
from .prefetch import next_layer_guesses, predict, score_prediction, submit_guesses
from .verification import SegmentMiss, StepRecord, exact_at_end, verify_segment


def route(runtime, layer: int, indices: mx.array, x: mx.array | None = None):
    """Slot indices for the router's expert `indices`, or None when waves are needed.

    `x` is the layer's input hidden state, which a predictor may use to prefetch."""
    L = runtime.cache.layers[layer]
    runtime.open_gate()  # the layer before this one loads what it needs before this one runs
    if runtime.mode == "device-wait" and indices.size <= L.num_slots:
        resident = runtime.waiter.resident
        if layer in resident and L.full and not runtime.observers:
            # It held every expert when the steps began and can lose none: nothing to fetch
            # or wait for, so no kernel (a model that fits decodes as stock's graph).
            L.counters.hits += indices.size
            return indices if L.identity else L.table[indices]
        # With a predictor, a request also carries guesses for the next layer (loaded while it
        # waits; none for a layer that holds every expert).
        guesses = None
        if runtime.predictor is not None and x is not None and layer + 1 not in resident:
            guesses = next_layer_guesses(runtime, layer, x)
        return runtime.waiter.route(layer, indices, guesses)
    L.refresh()
    if L.full and not runtime.observers:  # nothing can miss and nobody watches: no host read
        L.counters.hits += indices.size
        return indices if L.identity else L.table[indices]
    rec = runtime._record if runtime.mode == "optimistic" else None
    if rec is None and runtime.pipelined and indices.size <= L.num_slots and (
        runtime.defer_last or layer != runtime.last_moe_layer
    ):
        return close_gate(runtime, layer, indices, x)
    mapped = indices if L.identity else L.table[indices]
    if rec is not None:
        if layer not in rec.ends:
            rec.layers.append(layer)
            rec.indices.append(indices)
            rec.slot_maps.append(L.table_map)
            return mapped
        verify_segment(rec, indices, runtime.counters)  # raises SegmentMiss on a miss before here
        rec.loads_before = L.counters.misses
    scores = predict(runtime, layer, x) if runtime.predictor is not None and x is not None else None
    if scores is not None:
        mx.eval(indices, scores)  # one host round trip for both
    t0 = time.perf_counter()
    host = np.array(indices).reshape(-1)
    runtime.counters.sync_wait_s += time.perf_counter() - t0
    runtime.layer_syncs += 1
    if rec is not None:  # a segment end: reported with the step once it is kept
        pass
    elif runtime.deferred_observations is not None:  # a decode step that may yet be discarded
        runtime.deferred_observations.append((layer, host, x))
    else:
        runtime._observe(layer, host, x)
    uniq = np.unique(host)
    score_prediction(runtime, layer, uniq)
    if L.full:
        L.counters.hits += host.size
        runtime.cache.mark_used(layer, uniq)
        submit_guesses(runtime, layer, scores)
        return exact_at_end(runtime.cache.layers[layer], rec, layer, indices, host, mapped)
    # Repeated uses of an expert within the batch are hits; load_for counts the rest.
    L.counters.hits += host.size - len(uniq)
    if len(uniq) > L.num_slots:
        if rec is not None:  # only waves can compute it: per-layer routing does
            raise SegmentMiss(layer, {layer: uniq}, rec.known)
        return None  # the module streams the batch through in waves
    load_for(runtime, layer, uniq)
    runtime.cache.mark_used(layer, uniq)
    submit_guesses(runtime, layer, scores)
    L.refresh()
    return exact_at_end(L, rec, layer, indices, host, L.table[indices])


def load_for(runtime, layer: int, experts, protect=None, count_hits: bool = True) -> list:
    """Load the missing ones of `experts` now (the caller waits): an I/O stall.

    Every expert loaded on demand counts as a miss; with `count_hits` the others count
    as hits. Returns the experts loaded."""
    t0 = time.perf_counter()
    wanted = set(id_list(experts))
    L = runtime.cache.layers[layer]
    absent = not all(L.slot_of[e] >= 0 for e in wanted)
    got = runtime.cache.ensure(layer, experts, protect)
    loaded = len(got)
    L.counters.misses += loaded
    if count_hits:
        L.counters.hits += len(wanted) - loaded
    # A stall whenever something was absent: read now, or waited for while a prefetch
    # read it (which loads nothing here but is time blocked all the same).
    runtime.counters.io_wait_s += time.perf_counter() - t0 if absent else 0.0
    return got


def load_layers(runtime, wanted: dict) -> dict:
    """`load_for` for several layers at once ({layer: experts}; no hits counted): their
    reads are one submission (`ExpertCache.ensure_layers`). Returns {layer: loaded}."""
    t0 = time.perf_counter()
    layers = runtime.cache.layers
    absent = any(not all(layers[l].slot_of[e] >= 0 for e in id_list(ex)) for l, ex in wanted.items())
    got = runtime.cache.ensure_layers(wanted)
    for layer, loaded in got.items():
        layers[layer].counters.misses += len(loaded)
    runtime.counters.io_wait_s += time.perf_counter() - t0 if absent else 0.0
    return got


def account_step(runtime, record: StepRecord, pairs: list, loaded: dict | None = None, before=None):
    """A verified optimistic step (or its layers `before` a miss), as (layer, host
    indices) pairs: uses of experts not loaded for it were hits. Layers routed exactly
    at a segment end were counted there."""
    for layer, inds in pairs:
        if before is not None and layer >= before:
            continue
        if layer in record.routed_exact:
            runtime._observe(layer, inds)
            continue
        L = runtime.cache.layers[layer]
        uniq = np.unique(inds)
        got = (loaded or {}).get(layer, ())
        L.counters.hits += inds.size - sum(1 for e in uniq.tolist() if e in got)
        runtime.cache.mark_used(layer, uniq)
        runtime._observe(layer, inds)
