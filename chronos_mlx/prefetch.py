"""Decode-time prefetch: the predictor's guesses made at a host read, turned into loads.

At each layer whose routing is read back (a gate, a segment end) the predictor scores the
next layers' and next token's experts from the layer's input (`predict`, on its own MLX
stream); the ranking, victims and reads run on the runtime's planner thread (`submit_guesses`
-> `plan`), off the critical path; a layer those decisions target waits for them before its
slots are read (`wait_planned`). `prefetch_intent` brings in what the intent classifier
expects a generation to use, between prefill and the first decode step. Functions of a
`Runtime`'s state, like gates.py.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np


def predict(runtime, layer: int, x: mx.array):
    """Expert scores [n_targets, E] for the predictor's targets, on its own stream.

    Ranking them is left to the planner thread (numpy): every op evaluated here is
    paid for at each layer's host read."""
    with mx.stream(runtime.predict_stream):  # from the last position (prefill: the last prompt token)
        return runtime.predictor.scores(layer, x.reshape(-1, x.shape[-1])[-1:]).astype(mx.float32)


def wait_planned(runtime, layer: int):
    """Let prefetch decisions that target `layer` finish before its slots are read (time
    blocked here counts as stall: it is prediction's cost on the critical path)."""
    fut = runtime._planned.pop(layer, None)
    if fut is not None:
        t0 = time.perf_counter()
        fut.result()
        runtime.counters.io_wait_s += time.perf_counter() - t0


def submit_guesses(runtime, layer: int, scores):
    """Hand the scores computed at `layer` to the planner thread (see `plan`)."""
    if scores is None:
        return
    fut = runtime._planner.submit(plan, runtime, layer, np.array(scores))
    n_layers = len(runtime.cache.layers)
    for dl, dt in runtime.predictor.targets:
        if safe_target(layer, layer + dl, dt, n_layers):
            runtime._planned[layer + dl] = fut


def plan(runtime, layer: int, scores: np.ndarray):
    """Start loads of predicted experts for layers nothing queued is reading now.

    At layer l's host read every earlier layer of this token has run and no later
    layer has started, so later layers of this token and earlier-or-equal layers of
    the next token are safe targets (their slots are not being read); each of them
    waits for this decision before its next routing (`wait_planned`)."""
    cache = runtime.cache
    n_layers = len(cache.layers)
    m = min(runtime.guesses, scores.shape[-1])
    guesses = np.argsort(-scores, axis=-1, kind="stable")[..., :m]
    for (dl, dt), ranked in zip(runtime.predictor.targets, guesses):
        target = layer + dl
        if not safe_target(layer, target, dt, n_layers):
            continue
        T = cache.layers[target]
        if dt == 0:
            # Nothing queued reads a later layer's slots, and the guesses rank what it
            # will use better than its last token's experts do: they may fill it.
            limit, protect = T.num_slots, ()
        else:
            # The target's current experts are in use: room for them and for one
            # token's worth of demand.
            limit = min(T.num_slots - len(T.last_used), T.num_slots - runtime.info.get("top_k", 1))
            protect = T.last_used
        if limit > 0:
            cache.prefetch(target, ranked, limit, protect=protect)
            runtime._predicted[(target, dt)] = set(int(e) for e in ranked)


def score_prediction(runtime, layer: int, used: np.ndarray):
    """prediction_recall: how many used experts the last prediction for this layer named."""
    guess = runtime._predicted.pop((layer, 0), None)
    if guess is None:
        guess = runtime._predicted.pop((layer, 1), None)
    else:
        runtime._predicted.pop((layer, 1), None)
    if guess is not None:
        runtime.recall_hits += sum(1 for e in used.tolist() if e in guess)
        runtime.recall_total += len(used)


def prefetch_intent(runtime, ranked) -> None:
    """Before decoding: bring in what the intent predictor expects the generation to use.

    Called between prefill and the first decode step, when nothing queued reads any
    slot. Keeps room for one token's experts and what each layer used last."""
    top_k = runtime.info.get("top_k", 1)
    for layer, experts in enumerate(ranked):
        T = runtime.cache.layers[layer]
        limit = T.num_slots - max(top_k, len(T.last_used))
        if limit > 0:
            runtime.cache.prefetch(layer, experts, limit, protect=T.last_used)
            runtime._predicted[(layer, 1)] = set(int(e) for e in experts[: max(limit, top_k)])


def safe_target(layer: int, target: int, dt: int, n_layers: int) -> bool:
    """Whether guesses made at `layer` are prefetched into `target` (of this token when
    dt == 0, else of the next).

    Only the next layer of this token, and layer 0 of the next token (which no guess of
    the same token reaches): guesses further ahead are worse and would be superseded by
    the next layer's own, costing reads (measured: 2x the bytes, no fewer misses). A later
    layer of the next token would also compete with this token's use of its slots."""
    if dt == 0:
        return target == layer + 1 < n_layers
    return dt == 1 and target == 0 <= layer
