"""Decode-time prefetch: the predictor's guesses made at a host read, turned into loads.

At each layer whose routing is read back (a gate, a segment end) the predictor scores the
next layers' and next token's experts from the layer's input (`predict`, on its own MLX
stream); right there, on the main thread, the guesses are ranked, victims chosen and slots
claimed (`submit_guesses` -> `plan`), and the reads go to the cache's reader threads. The
decisions once ran on a planner thread of their own, which every targeted layer then waited
for: on the 2-core box that wait averaged ~0.45 ms a layer for ~0.13 ms of work, and made the
gate predictor's stall larger than none at all (4.7 against 2.9 ms a token; inline 0.9).
`prefetch_intent` brings in what the intent classifier expects a generation to use, between
prefill and the first decode step. Functions of a `Runtime`'s state, like gates.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def predict(runtime, layer: int, x: mx.array, own_stream: bool = True):
    """Expert scores [n_targets, E] for the predictor's targets, on its own stream (for the
    host to read), or with `own_stream=False` on the stream being built (for a kernel of that
    stream to read: MLX waits on the host for an input from another stream within one
    evaluation — `Fence::wait` in its CUDA backend — so a step whose kernels took the
    predictor's stream's scores would stop the host at every layer until the GPU caught up).

    Ranking them is left to numpy (`plan`): every op evaluated here is paid for at each
    layer's host read. None where no target of the predictor lies ahead of `layer`."""
    p = runtime.predictor
    if p.num_layers and not any(dt or layer + dl < p.num_layers for dl, dt in p.targets):
        return None
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] > 1:
        x = x[-1:]  # the last position (prefill: the last prompt token)
    if not own_stream:
        return p.scores(layer, x).astype(mx.float32)
    with mx.stream(runtime.predict_stream):
        return p.scores(layer, x).astype(mx.float32)


def next_layer_guesses(runtime, layer: int, x: mx.array):
    """(layer + 1, the predictor's `runtime.guesses` best experts for it, a device array) for a
    device-wait request to carry (device_wait.DeviceWaiter.route); computed on the device,
    never read by the host unless the layer asks. None where the predictor has no next-layer
    target or `layer` is the last MoE layer."""
    p = runtime.predictor
    targets = list(p.targets)
    if (1, 0) not in targets or layer + 1 >= len(runtime.cache.layers):
        return None
    scores = predict(runtime, layer, x, own_stream=False)  # the layer's kernel reads them on its stream
    if scores is None:
        return None
    row = scores.reshape(len(targets), -1)[targets.index((1, 0))]
    m = min(runtime.guesses, row.size)
    return layer + 1, mx.argpartition(-row, kth=m - 1)[:m].astype(mx.uint32)


def submit_guesses(runtime, layer: int, scores):
    """Prefetch the guesses scored at `layer` (see `plan`); the reads run in the background."""
    if scores is not None:
        plan(runtime, layer, np.array(scores))


def plan(runtime, layer: int, scores: np.ndarray):
    """Start loads of predicted experts for layers nothing queued is reading now.

    At layer l's host read every earlier layer of this token has run and no later
    layer has started, so later layers of this token and earlier-or-equal layers of
    the next token are safe targets (their slots are not being read)."""
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
