"""Activation statistics: which experts each MoE layer uses, and which ones fire together.

`ActivationStats` is a routing observer (`runtime.observers.append(stats)`, or
`ActivationStats.for_runtime(runtime)`): it is handed the flat expert ids of every forward pass
of every MoE layer (tokens x top_k) and keeps, per layer,
- `totals`: raw use counts since it started (what a profile stores),
- `counts`: the same with exponential decay, half-life in tokens (what "hot now" means),
- `coactivation`: how often two experts were chosen for the same token (raw counts; the
  diagonal holds each expert's own uses),
- `tokens`: how many tokens went through the layer.

`observe` only queues the ids (about a microsecond); they are folded into the arrays in
vectorised batches (every 64 passes of a layer, or when an array is read), so a decode
step pays almost nothing for being watched, whatever the number of layers.
"""

from __future__ import annotations

import numpy as np

DEFAULT_HALF_LIFE_TOKENS = 256.0
_FLUSH_PASSES = 64
_FLUSH_TOKENS = 4096


class ActivationStats:
    """Per-layer expert use counts (raw and decayed) and co-activation counts."""

    def __init__(
        self, num_layers: int, num_experts: int, top_k: int, half_life_tokens: float = DEFAULT_HALF_LIFE_TOKENS
    ):
        if half_life_tokens <= 0:
            raise ValueError("half_life_tokens must be positive")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.half_life_tokens = float(half_life_tokens)
        self._totals = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._counts = np.zeros((num_layers, num_experts), dtype=np.float64)
        self._coactivation = np.zeros((num_layers, num_experts, num_experts), dtype=np.int64)
        self._tokens = np.zeros(num_layers, dtype=np.int64)
        self._pending: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
        self._pending_tokens = [0] * num_layers

    @classmethod
    def for_runtime(cls, runtime, half_life_tokens: float = DEFAULT_HALF_LIFE_TOKENS) -> "ActivationStats":
        """Statistics shaped for `runtime`'s model, attached as one of its observers."""
        info = runtime.info
        stats = cls(len(runtime.cache.layers), info["num_experts"], info["top_k"], half_life_tokens)
        runtime.observers.append(stats)
        return stats

    def detach(self, runtime):
        if self in runtime.observers:
            runtime.observers.remove(self)

    # --- the observer ------------------------------------------------------------------
    def observe(self, layer: int, expert_ids: np.ndarray):
        """One forward pass of `layer`: `expert_ids` holds tokens x top_k ids, row-major."""
        ids = np.array(expert_ids, dtype=np.int64).reshape(-1)  # a copy: the caller may reuse its buffer
        self._pending[layer].append(ids)
        self._pending_tokens[layer] += len(ids) // self.top_k
        if len(self._pending[layer]) >= _FLUSH_PASSES or self._pending_tokens[layer] >= _FLUSH_TOKENS:
            self._flush(layer)

    def _flush(self, layer: int):
        passes = self._pending[layer]
        if not passes:
            return
        self._pending[layer], self._pending_tokens[layer] = [], 0
        ids = np.concatenate(passes).reshape(-1, self.top_k)
        per_pass = np.array([len(p) // self.top_k for p in passes])
        n = ids.shape[0]
        # Sequential semantics: before each pass the counts decay by its tokens, so a pass's
        # uses have decayed by the tokens of the passes after it (all in this batch).
        after = n - np.cumsum(per_pass)
        weights = np.repeat(0.5 ** (after / self.half_life_tokens), per_pass * self.top_k)
        flat = ids.reshape(-1)
        self._counts[layer] = self._counts[layer] * 0.5 ** (n / self.half_life_tokens) + np.bincount(
            flat, weights=weights, minlength=self.num_experts
        )
        self._totals[layer] += np.bincount(flat, minlength=self.num_experts)
        self._tokens[layer] += n
        onehot = np.zeros((n, self.num_experts), dtype=np.float32)
        np.put_along_axis(onehot, ids, 1.0, axis=1)
        # float32 matmul (BLAS) is exact here: every entry is an integer <= n < 2**24.
        self._coactivation[layer] += np.rint(onehot.T @ onehot).astype(np.int64)

    def flush(self):
        for layer in range(self.num_layers):
            self._flush(layer)

    # --- reading -----------------------------------------------------------------------
    @property
    def totals(self) -> np.ndarray:
        self.flush()
        return self._totals

    @property
    def counts(self) -> np.ndarray:
        self.flush()
        return self._counts

    @property
    def coactivation(self) -> np.ndarray:
        self.flush()
        return self._coactivation

    @property
    def tokens(self) -> np.ndarray:
        self.flush()
        return self._tokens

    def frequencies(self) -> np.ndarray:
        """Raw uses per token, per layer and expert (each row sums to top_k)."""
        return self.totals / np.maximum(self.tokens, 1)[:, None]

    def hot(self, layer: int, n: int, decayed: bool = True) -> np.ndarray:
        """The `n` most used experts of `layer`, most used first (decayed counts by default)."""
        scores = self.counts[layer] if decayed else self.totals[layer]
        return np.argsort(-scores, kind="stable")[:n]

    def reset(self):
        self.flush()
        for a in (self._totals, self._counts, self._coactivation, self._tokens):
            a[...] = 0
