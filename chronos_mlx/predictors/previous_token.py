"""PreviousTokenPredictor: the experts of the latest tokens (no training)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..traces import RoutingTrace
from .base import Predictor, TOKEN_TARGETS, _as_ids, _multi_hot


class PreviousTokenPredictor(Predictor):
    """"Same experts as the previous token": the latest token's experts, then older ones.

    Score = sum over the last `window` tokens of decay**age for each expert they used, so
    the latest token's experts always rank first and older ones fill larger guess sets.
    """

    name = "previous-token"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, window: int = 4, decay: float = 0.4):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.window, self.decay = window, decay
        self.targets = TOKEN_TARGETS
        self.reset()

    @classmethod
    def for_trace(cls, trace: RoutingTrace, **kw) -> "PreviousTokenPredictor":
        return cls(trace.num_layers, trace.num_experts, trace.top_k, **kw)

    def reset(self):
        self._hist = [np.zeros((0, self.top_k), dtype=np.int64) for _ in range(self.num_layers)]

    def observe(self, layer, expert_ids):
        ids = _as_ids(expert_ids, self.top_k)
        self._hist[layer] = np.concatenate([self._hist[layer], ids])[-self.window :]

    def _score_rows(self, hist: np.ndarray) -> np.ndarray:
        s = np.zeros(self.num_experts, dtype=np.float32)
        for age, ids in enumerate(hist[::-1]):
            s[ids] += self.decay**age
        return s

    def scores(self, layer, x=None):
        s = self._score_rows(self._hist[layer])
        return mx.array(np.stack([s] * len(self.targets)))

    def score_trace(self, seq):
        L, T, _ = seq.experts.shape
        hot = _multi_hot(seq.experts, self.num_experts)  # [L, T, E]
        s = np.zeros_like(hot)
        for age in range(self.window):
            s[:, age:] += (self.decay**age) * hot[:, : T - age]
        return np.repeat(s[:, :, None, :], len(self.targets), axis=2)
