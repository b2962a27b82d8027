"""Next-layer guesses for trained-like routing (bench_routing.py) as good as a trained model's,
for benchmarks only.

The bench's table routers look their rows up by position, so a predictor that applies the next
layer's router early measures nothing real: it reads either the replaced random linear (guesses
no better than popularity) or, were it given the table, the answer itself. `TableGuesses` scores
layer l+1's experts at the current position as

    onehot(layer l+1's top-k there) + noise * N(0, 1)

with `noise` fitted (`calibrate_guess_noise`) so that its recall of the next layer's experts
over decode positions equals what the cross-layer gate predictor (layer l+1's router on layer
l's MoE input) reaches on the trained demo model over the same text (`demo_next_layer_recall`).
So device-wait requests that carry guesses, and prefetching, can be measured on the
Qwen3-30B-A3B geometry with a trained model's predictability instead of none or a perfect one.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from .bench_routing import RoutingParams, RoutingTable
from .predictors.base import Predictor


def _recall(guessed: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of `truth` [T, k] found in the same row of `guessed` [T, G]."""
    if not len(truth):
        return 1.0
    hits = (guessed[:, :, None] == truth[:, None, :]).any(axis=1).sum()
    return float(hits / truth.size)


def demo_next_layer_recall(sequences: list, n_prompts: list, guesses: int, model_path=None) -> float:
    """Recall of the cross-layer gate predictor's `guesses` best experts for layer l+1, made
    from layer l's MoE input, in the trained demo model (or `model_path`), over the decode
    positions (>= n_prompt) of `sequences` and every pair of adjacent MoE layers."""
    from mlx.utils import tree_unflatten
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from . import DEFAULT_MODEL
    from .traces import _Recorder, find_routers, moe_modules

    model, _ = load(str(model_path or DEFAULT_MODEL))
    model.set_dtype(mx.float32)
    routers = find_routers(model)
    switches = moe_modules(model)
    sink: list = []
    model.update_modules(tree_unflatten([(name, _Recorder(m, i, sink)) for i, (name, m) in enumerate(switches)]))
    found = total = 0
    for seq, n in zip(sequences, n_prompts):
        sink.clear()
        mx.eval(model(mx.array([int(t) for t in seq])[None], cache=make_prompt_cache(model)))
        calls = sorted(sink, key=lambda s: s[0])
        for (layer, x, _), (_, _, nxt) in zip(calls, calls[1:]):
            scores = np.array(routers[layer + 1].logits(x.reshape(-1, x.shape[-1])).astype(mx.float32))[n:]
            truth = np.array(nxt).reshape(-1, nxt.shape[-1])[n:]
            guessed = np.argsort(-scores, axis=1, kind="stable")[:, :guesses]
            found += _recall(guessed, truth) * truth.size
            total += truth.size
    sink.clear()
    return found / total if total else 1.0


def _noise(params: RoutingParams, layer: int, positions: int) -> np.ndarray:
    return np.random.default_rng([params.seed, layer, 3]).standard_normal((positions, params.num_experts))


def guess_scores(table: RoutingTable, layer: int, tokens, noise: float) -> np.ndarray:
    """[T, E] float32 scores of layer `layer`'s experts at each position of `tokens`."""
    truth = table.experts(layer, tokens)
    s = noise * _noise(table.p, layer, len(truth))
    np.put_along_axis(s, truth, np.take_along_axis(s, truth, axis=1) + 1.0, axis=1)
    return s.astype(np.float32)


def guess_recall(params: RoutingParams, sequences: list, n_prompts: list, guesses: int, noise: float,
                 layers: int = 4) -> float:
    """Recall of `TableGuesses` at this noise over decode positions (offline)."""
    table = RoutingTable(params, layers)
    found = total = 0
    for seq, n in zip(sequences, n_prompts):
        for layer in range(1, layers):
            truth = table.experts(layer, seq)[n:]
            guessed = np.argsort(-guess_scores(table, layer, seq, noise)[n:], axis=1, kind="stable")[:, :guesses]
            found += _recall(guessed, truth) * truth.size
            total += truth.size
    return found / total if total else 1.0


def calibrate_guess_noise(params: RoutingParams, sequences: list, n_prompts: list, guesses: int, target: float,
                          layers: int = 4) -> tuple[float, float]:
    """(noise, the recall it gives) closest to `target` (recall falls as noise grows)."""
    lo, hi = 0.0, 8.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if guess_recall(params, sequences, n_prompts, guesses, mid, layers) > target:
            lo = mid
        else:
            hi = mid
    noise = (lo + hi) / 2
    return noise, guess_recall(params, sequences, n_prompts, guesses, noise, layers)


class TableGuesses(Predictor):
    """Layer l+1's experts at the current position, blurred to a trained model's recall
    (module doc). Attach after `install_trained_routing`; its scores follow the sequence the
    routing was last given (`TrainedRouting.set_sequence`)."""

    name = "table-guesses"
    needs_hidden = True
    targets = ((1, 0),)

    def __init__(self, routing, noise: float):
        self.routing = routing
        self.noise = float(noise)
        self.num_layers = len(routing.blocks)
        self.num_experts = routing.params.num_experts
        self.top_k = routing.params.top_k
        self._tables: list = []
        self._tokens = None

    def _rows(self, layer: int) -> mx.array:
        tokens = self.routing.tokens
        if tokens is not self._tokens:  # a new text: its scores, once
            self._tables = [mx.array(guess_scores(self.routing.table, i, tokens, self.noise))
                            for i in range(self.num_layers)]
            self._tokens = tokens
        return self._tables[layer]

    def scores(self, layer: int, x: Optional[mx.array] = None) -> mx.array:
        target = min(layer + 1, self.num_layers - 1)
        # The position the runtime predicts from (the last of the layer's call), as the layer's
        # attention noted it this step.
        position = self.routing.blocks[layer][2]._position
        pos = position.offset if position.offset is not None else (position.shared.offset or 0)
        pos += position.count - 1
        table = self._rows(target)
        row = table[pos % table.shape[0]][None]
        return mx.depends(row, x) if x is not None else row  # made from the layer's input, as a gate's


def calibrate_guesses_for_workload(params: RoutingParams, workload, prompts: list, forced: list, guesses: int, *,
                                   limit=None, max_prompt_tokens=128, max_tokens=64, split="heldout") -> RoutingParams:
    """`params` with `guess_noise` fitted on the replayed texts (`prompts`/`forced`, the
    benchmarked model's tokens) to the demo model's gate-predictor recall on the same texts cut
    the same way (as `bench_routing.calibrate_for_workload` does for hit rates)."""
    from dataclasses import replace

    from . import DEFAULT_MODEL
    from .bench import replay_texts

    demo_prompts, demo_forced = replay_texts(workload, DEFAULT_MODEL, limit=limit, max_prompt_tokens=max_prompt_tokens,
                                             max_tokens=max_tokens, split=split)
    target = demo_next_layer_recall([p + f for p, f in zip(demo_prompts, demo_forced)],
                                    [len(p) for p in demo_prompts], guesses)
    noise, fitted = calibrate_guess_noise(params, [p + f for p, f in zip(prompts, forced)],
                                          [len(p) for p in prompts], guesses, target)
    return replace(params, guess_noise=noise, guess_recall={"guesses": guesses, "demo": target, "fitted": fitted})
