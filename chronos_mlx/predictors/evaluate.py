"""Offline evaluation of predictors on recorded routing (recall and precision at k)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..traces import RoutingTrace
from .base import _multi_hot
from .intent import PromptSummary


def evaluate_predictors(
    predictors: dict,
    trace: RoutingTrace,
    ks: Sequence[int] = (8, 16),
    positions: str = "generated",
) -> dict:
    """Recall and precision of each predictor's top-k guesses against the true top-k sets.

    positions: "generated" counts predictions whose target token was generated (decode),
    "all" counts every position. Returns {name: {target: {k: {"recall", "precision", "n"}}}}.
    """
    res = {}
    for name, p in predictors.items():
        acc = {t: {k: [0.0, 0] for k in ks} for t in p.targets}
        for seq in trace.sequences:
            s = p.score_trace(seq)  # [L, T, nT, E]
            L, T, topk = seq.experts.shape
            truth = _multi_hot(seq.experts.astype(np.int64), trace.num_experts)  # [L, T, E]
            gen = seq.generated if positions == "generated" else np.ones(T, bool)
            for j, (dl, dt) in enumerate(p.targets):
                if dl >= L or dt >= T:
                    continue
                sc = s[: L - dl, : T - dt, j]  # predictions made at (l, t)
                tr = truth[dl:, dt:]  # the truth at (l + dl, t + dt)
                keep = gen[dt:]
                if not keep.any():
                    continue
                sc, tr = sc[:, keep], tr[:, keep]
                order = np.argsort(-sc, axis=-1, kind="stable")
                for k in ks:
                    hits = np.take_along_axis(tr, order[..., :k], axis=-1).sum()
                    acc[(dl, dt)][k][0] += float(hits)
                    acc[(dl, dt)][k][1] += int(tr.shape[0] * tr.shape[1])
        out = {}
        for t, per_k in acc.items():
            out[t] = {}
            for k, (hits, n) in per_k.items():
                out[t][k] = {
                    "recall": hits / (n * trace.top_k) if n else float("nan"),
                    "precision": hits / (n * k) if n else float("nan"),
                    "n": n,
                }
        res[name] = out
    return res


def prompt_baseline_scores(summary: PromptSummary) -> np.ndarray:
    """The trivial intent baseline: the prompt's own most-used experts (recent use breaks ties)."""
    return summary.hist + 1e-3 * summary.recent


def evaluate_intent(
    scorers: dict,
    trace: RoutingTrace,
    sizes: Sequence[int] = (8, 16, 24, 32),
    recent: int = 16,
) -> dict:
    """Per scorer (name -> fn(PromptSummary) -> [L, E] scores), per set size m:
    recall of the generation's expert set per layer, precision, and coverage (fraction of the
    generated tokens' expert activations that fall in the predicted set)."""
    E = trace.num_experts
    res = {n: {m: {"recall": 0.0, "precision": 0.0, "coverage": 0.0} for m in sizes} for n in scorers}
    count = 0
    for seq in trace.sequences:
        P = seq.n_prompt
        if seq.length <= P:
            continue
        hid = seq.hidden[:, :P] if seq.hidden is not None else None
        summ = PromptSummary.from_routing(seq.experts[:, :P], E, recent, hid)
        counts = _multi_hot(seq.experts[:, P:].astype(np.int64), E).sum(1)  # [L, E] uses per expert
        used = counts > 0
        count += 1
        for name, fn in scorers.items():
            order = np.argsort(-fn(summ), axis=-1, kind="stable")
            for m in sizes:
                sel = order[:, :m]
                hit_set = np.take_along_axis(used, sel, -1).sum(-1)
                hit_act = np.take_along_axis(counts, sel, -1).sum(-1)
                r = res[name][m]
                r["recall"] += float(np.mean(hit_set / np.maximum(used.sum(-1), 1)))
                r["precision"] += float(np.mean(hit_set / m))
                r["coverage"] += float(np.mean(hit_act / np.maximum(counts.sum(-1), 1)))
    for name in res:
        for m in sizes:
            for key in res[name][m]:
                res[name][m][key] /= max(count, 1)
    res["_sequences"] = count
    return res
