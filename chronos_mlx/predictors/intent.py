"""IntentClassifier: at prefill, the experts the whole generation will use, per layer, and
its training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
import numpy as np

from ..traces import RoutingTrace
from .base import _as_ids, _load_network, _multi_hot, _save_network, top_ids


@dataclass
class IntentConfig:
    num_layers: int
    num_experts: int
    hidden_size: int
    top_k: int
    recent: int = 16  # the prompt's last N tokens make the "recent" histogram
    hidden_rank: int = 0  # > 0: add a low-rank term from the pooled MoE inputs
    fingerprint: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class PromptSummary:
    """What the intent classifier reads from a prompt: per-layer expert histograms and mean MoE input."""

    hist: np.ndarray  # [L, E] fraction of the prompt's tokens that used each expert
    recent: np.ndarray  # [L, E] the same over the last `recent` tokens
    pooled: Optional[np.ndarray]  # [L, D] mean MoE input over the prompt, or None

    @classmethod
    def from_routing(cls, experts: np.ndarray, num_experts: int, recent: int, hidden=None) -> "PromptSummary":
        """experts [L, T, k]; hidden [L, T, D] or None."""
        ex = np.asarray(experts).astype(np.int64)
        T = max(ex.shape[1], 1)
        hot = _multi_hot(ex, num_experts)  # [L, T, E]
        hist = hot.sum(1) / T
        r = hot[:, -recent:]
        rec = r.sum(1) / max(r.shape[1], 1)
        pooled = None if hidden is None else np.asarray(hidden, dtype=np.float32).mean(1)
        return cls(hist.astype(np.float32), rec.astype(np.float32), pooled)

    def features(self) -> np.ndarray:
        """[L, E, 4]: hist, recent, log(hist + 0.01), log(recent + 0.01)."""
        h, r = self.hist, self.recent
        return np.stack([h, r, np.log(h + 0.01), np.log(r + 0.01)], axis=-1).astype(np.float32)


class IntentClassifier(nn.Module):
    """At prefill: for every MoE layer, the experts the whole generation will use, ranked.

        logit[l, e] = w_l . [hist, recent, log(hist + .01), log(recent + .01)][l, e] + bias[l, e]
                      (+ ((z_l @ U_l) @ V_l)[e] with hidden_rank > 0)

    hist / recent: the prompt's per-layer expert frequencies over the whole prompt and over
    its last `recent` tokens; z_l: the standardised mean MoE input of layer l over the prompt.
    Trained (softmax cross-entropy) to match how often the generation uses each expert, so the
    first m experts cover as many of the generation's expert activations as possible. It starts
    at the trivial baseline (the prompt's most-used experts). With ~100 training prompts the
    hidden-state term overfits (docs/predictors.md), hence hidden_rank 0 by default.

    Runtime use: `reset()`, then `observe(layer, ids)` (Runtime observer protocol) and, with
    hidden_rank > 0, `observe_hidden(layer, x)` during prefill; `ranked(m)` -> [L, m] expert ids.
    """

    name = "intent"

    def __init__(self, config: IntentConfig):
        super().__init__()
        c = config
        object.__setattr__(self, "config", c)
        L, D, E, r = c.num_layers, c.hidden_size, c.num_experts, c.hidden_rank
        self.w = mx.array(np.tile(np.array([0.0, 0.0, 1.0, 0.0], np.float32), (L, 1)))
        self.bias = mx.zeros((L, E))
        if r:
            self.mu = mx.zeros((L, D))
            self.inv_sigma = mx.ones((L, D))
            self.U = mx.random.normal((L, D, r)) * (0.01 / np.sqrt(D))
            self.V = mx.zeros((L, r, E))
            self.freeze(keys=["mu", "inv_sigma"], recurse=False)
        object.__setattr__(self, "_acc", None)

    def num_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.trainable_parameters()))

    def __call__(self, feats, pooled=None):
        """Batched: feats [B, L, E, 4]; pooled [B, L, D] (or None) -> logits [B, L, E]."""
        s = (feats * self.w[:, None, :]).sum(-1) + self.bias
        if self.config.hidden_rank and pooled is not None:
            z = (pooled - self.mu) * self.inv_sigma
            s = s + mx.einsum("blr,lre->ble", mx.einsum("bld,ldr->blr", z, self.U), self.V)
        return s

    def predict(self, summary: PromptSummary) -> np.ndarray:
        """[L, E] scores for one prompt (higher: more of the generation's activations)."""
        pooled = None if summary.pooled is None else mx.array(summary.pooled)[None]
        return np.array(self(mx.array(summary.features())[None], pooled)[0])

    # -- runtime accumulation --------------------------------------------------------
    def reset(self):
        L = self.config.num_layers
        object.__setattr__(self, "_acc", {"ids": [[] for _ in range(L)], "xsum": [None] * L, "xn": [0] * L})

    def observe(self, layer: int, expert_ids):
        if self._acc is None:
            self.reset()
        self._acc["ids"][layer].append(_as_ids(expert_ids, self.config.top_k))

    def observe_hidden(self, layer: int, x: mx.array):
        """Add a prefill chunk's MoE input [..., D] to the layer's running sum (stays lazy)."""
        if self._acc is None:
            self.reset()
        x = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        acc = self._acc
        s = x.sum(0)
        acc["xsum"][layer] = s if acc["xsum"][layer] is None else acc["xsum"][layer] + s
        acc["xn"][layer] += x.shape[0]

    def summary(self) -> PromptSummary:
        c = self.config
        if self._acc is None:
            self.reset()
        acc = self._acc
        hist = np.zeros((c.num_layers, c.num_experts), dtype=np.float32)
        rec = np.zeros_like(hist)
        for layer, parts in enumerate(acc["ids"]):
            if parts:
                s = PromptSummary.from_routing(np.concatenate(parts)[None], c.num_experts, c.recent)
                hist[layer], rec[layer] = s.hist[0], s.recent[0]
        pooled = None
        if all(v is not None for v in acc["xsum"]):
            pooled = np.stack([np.array(v) / max(n, 1) for v, n in zip(acc["xsum"], acc["xn"])])
        return PromptSummary(hist, rec, pooled)

    def ranked(self, m: Optional[int] = None, summary: Optional[PromptSummary] = None) -> np.ndarray:
        """[L, m] expert ids per layer, most likely first (default: all experts)."""
        s = self.predict(summary or self.summary())
        return top_ids(s, m or self.config.num_experts)

    # -- files -----------------------------------------------------------------------
    def save(self, path) -> Path:
        return _save_network(self, path, "intent", self.config)

    @classmethod
    def load(cls, path, model=None, fingerprint: Optional[dict] = None) -> "IntentClassifier":
        ic = _load_network(cls, IntentConfig, path, "intent", model, fingerprint)
        if ic.config.hidden_rank:
            ic.freeze(keys=["mu", "inv_sigma"], recurse=False)
        mx.eval(ic.parameters())
        return ic


def intent_samples(trace: RoutingTrace, recent: int = 16, augment: int = 0, seed: int = 0):
    """Training samples: (PromptSummary, uses [L, E] per expert, weight) per sequence.

    The real sample: the prompt -> how often the generated tokens used each expert. With
    `augment` > 0, also `augment` cut points inside each prompt (weight 0.5): the prefix ->
    the uses of the next (generation length) tokens of the recorded sequence.
    """
    rng = np.random.default_rng(seed)
    E = trace.num_experts
    out = []
    for seq in trace.sequences:
        ex = seq.experts
        P, T = seq.n_prompt, seq.length
        if T <= P:
            continue
        cuts = [(P, T, 1.0)]
        lo = max(8, P // 4)
        if augment and P - 1 > lo:
            for c in rng.integers(lo, P, size=augment):
                cuts.append((int(c), min(T, int(c) + T - P), 0.5))
        for c, end, w in cuts:
            hid = seq.hidden[:, :c] if seq.hidden is not None else None
            s = PromptSummary.from_routing(ex[:, :c], E, recent, hid)
            uses = _multi_hot(ex[:, c:end].astype(np.int64), E).sum(1)
            out.append((s, uses.astype(np.float32), w))
    return out


def train_intent(
    trace: RoutingTrace,
    *,
    recent: int = 16,
    hidden_rank: int = 0,
    augment: int = 0,
    epochs: int = 400,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: Optional[Callable[[int, int, float], None]] = None,
) -> tuple[IntentClassifier, dict]:
    """Fit an IntentClassifier on `trace` (full batch, AdamW). Returns (model, history)."""
    samples = intent_samples(trace, recent, augment, seed=seed)
    if not samples:
        raise ValueError("no sequence with generated tokens in the trace")
    L, E, D = trace.num_layers, trace.num_experts, trace.hidden_size
    use_hidden = hidden_rank > 0 and all(s.pooled is not None for s, _, _ in samples)
    cfg = IntentConfig(L, E, D, trace.top_k, recent, hidden_rank if use_hidden else 0, dict(trace.fingerprint))
    mx.random.seed(seed)
    ic = IntentClassifier(cfg)
    F = mx.array(np.stack([s.features() for s, _, _ in samples]))
    pooled = None
    if use_hidden:
        P = np.stack([s.pooled for s, _, _ in samples])
        ic.mu = mx.array(P.mean(0))
        ic.inv_sigma = mx.array(1.0 / np.maximum(P.std(0), 1e-6))
        ic.freeze(keys=["mu", "inv_sigma"], recurse=False)
        pooled = mx.array(P)
    U = np.stack([u for _, u, _ in samples])
    Q = mx.array(U / np.maximum(U.sum(-1, keepdims=True), 1.0))
    W = mx.array(np.array([w for _, _, w in samples], dtype=np.float32))

    def loss_fn(m):
        per = -(Q * nn.log_softmax(m(F, pooled), axis=-1)).sum(-1).mean(-1)
        return (per * W).sum() / W.sum()

    opt = optim.AdamW(learning_rate=lr, weight_decay=weight_decay)
    lg = nn.value_and_grad(ic, loss_fn)
    mx.eval(ic.parameters())
    history = {"initial_loss": loss_fn(ic).item(), "loss": []}
    for step in range(epochs):
        v, g = lg(ic)
        opt.update(ic, g)
        mx.eval(ic.parameters(), opt.state, v)
        history["loss"].append(v.item())
        if progress is not None:
            progress(step + 1, epochs, v.item())
    history["final_loss"] = loss_fn(ic).item()
    ic.config.meta.update(epochs=epochs, seed=seed, augment=augment, lr=lr, samples=len(samples), train_sequences=len(trace))
    return ic, history
