"""CrossLayerGatePredictor: layer l+j's router applied to layer l's MoE input (no training)."""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..traces import find_routers
from .base import LOOKAHEAD_TARGETS, Predictor, Target


class CrossLayerGatePredictor(Predictor):
    """Routers reused across layers: row (j, 0) = layer l+j's router on layer l's MoE input.

    Token targets (0, 1), (0, 2) use layer l's own router on the current token (the soft
    form of "same experts as the previous token"). Holds references to the model's router
    modules (nothing copied); find them with `traces.find_routers`.
    """

    name = "cross-layer-gate"
    needs_hidden = True

    def __init__(self, routers, top_k: int, targets: Sequence[Target] = LOOKAHEAD_TARGETS):
        self.routers = list(routers)
        self.num_layers = len(self.routers)
        self.num_experts = self.routers[0].num_experts
        self.top_k = top_k
        self.targets = tuple(tuple(t) for t in targets)

    @classmethod
    def from_model(cls, model, top_k: Optional[int] = None, **kw) -> "CrossLayerGatePredictor":
        if top_k is None:
            args = getattr(model, "args", None)
            top_k = next(
                (getattr(args, k) for k in ("num_experts_per_tok", "top_k", "moe_top_k") if getattr(args, k, None)),
                8,
            )
        return cls(find_routers(model), int(top_k), **kw)

    def _logits(self, layer: int, x: mx.array) -> mx.array:
        if len(self.targets) == 1 and layer + self.targets[0][0] < self.num_layers:
            # What the runtime asks at every layer's host read: one router, no stacking (each
            # op here costs the decode step ~20-40 us on MLX's CPU backend).
            return self.routers[layer + self.targets[0][0]].logits(x).astype(mx.float32)[..., None, :]
        rows = []
        E = self.num_experts
        for dl, _ in self.targets:
            if layer + dl < self.num_layers:
                rows.append(self.routers[layer + dl].logits(x).astype(mx.float32))
            else:
                rows.append(mx.zeros(x.shape[:-1] + (E,), dtype=mx.float32))
        return mx.stack(rows, axis=-2)

    def scores(self, layer, x=None):
        if x is None:
            raise ValueError("CrossLayerGatePredictor.scores needs the layer's MoE input x")
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] > 1:
            x = x[-1:]  # [1, D]: quantized matmuls want a matrix (CUDA)
        return self._logits(layer, x.astype(mx.float32))[0]

    def score_trace(self, seq):
        out = []
        for layer in range(self.num_layers):
            x = mx.array(seq.hidden[layer]).astype(mx.float32)
            out.append(np.array(self._logits(layer, x)))
        return np.stack(out)
