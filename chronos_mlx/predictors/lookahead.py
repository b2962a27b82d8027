"""LookaheadRouter: a small trained network per MoE layer that predicts the next layers'
and next tokens' experts, and its training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
import numpy as np

from ..traces import RoutingTrace
from .base import LOOKAHEAD_TARGETS, Predictor, Target, _dense_router, _load_network, _save_network


@dataclass
class LookaheadConfig:
    num_layers: int
    num_experts: int
    hidden_size: int
    top_k: int
    targets: list = field(default_factory=lambda: [list(t) for t in LOOKAHEAD_TARGETS])
    rank: int = 0  # bottleneck width; 0 = default_rank(hidden_size, ...)
    fingerprint: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.targets = [list(t) for t in self.targets]
        if not self.rank:
            self.rank = default_rank(self.hidden_size, self.num_experts, len(self.targets))


def default_rank(hidden_size: int, num_experts: int, n_targets: int) -> int:
    """Bottleneck width: about half the hidden size, at most 256.

    Parameters per layer ~ rank * (hidden + 2 * n_targets * E): 1.4 M in all for the demo
    model (8 layers, D 384, 64 experts), 38 M for Qwen3-30B-A3B's geometry (48 layers,
    D 2048, 128 experts: 0.1 % of its weights).
    """
    return int(min(256, max(32, hidden_size // 2)))


class LookaheadRouter(nn.Module, Predictor):
    """Per MoE layer l: predicts the experts of layers l+1..l+d (same token) and of layer l
    for the next tokens, from layer l's MoE input x.

        h = x @ A_l + a_l                         (D -> rank)
        s = [h, silu(h)] @ W_l + b_l              (2 rank -> n_targets * E)

    a low-rank map with a linear and a nonlinear path. Training standardises x with the
    traces' per-layer mean and spread and folds that into A, a when it ends, so a call is two
    matrix products. With the model's routers given, `A` and the linear half of `W` start
    from the truncated SVD of the routers it imitates (layer l+j's router for target (j, 0),
    layer l's own for token targets): training starts at the cross-layer-gate baseline.
    """

    name = "lookahead"
    needs_hidden = True

    def __init__(self, config: LookaheadConfig):
        nn.Module.__init__(self)
        c = config
        object.__setattr__(self, "config", c)
        L, D, E, r = c.num_layers, c.hidden_size, c.num_experts, c.rank
        nT = len(c.targets)
        self.A = mx.random.normal((L, D, r)) * (1.0 / np.sqrt(D))
        self.a = mx.zeros((L, r))
        self.W = mx.zeros((L, 2 * r, nT * E))
        self.b = mx.zeros((L, nT * E))
        object.__setattr__(self, "_std", None)  # (mu [L, D], inv_sigma [L, D]) while training

    # -- interface -------------------------------------------------------------------
    @property
    def targets(self):
        return tuple(tuple(t) for t in self.config.targets)

    @property
    def num_layers(self):
        return self.config.num_layers

    @property
    def num_experts(self):
        return self.config.num_experts

    @property
    def top_k(self):
        return self.config.top_k

    def num_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))

    def _forward(self, layer, x):
        """x [..., D] -> [..., n_targets * E] for one layer (any float dtype)."""
        x = x.astype(self.A.dtype)
        if self._std is not None:
            x = (x - self._std[0][layer]) * self._std[1][layer]
        h = x @ self.A[layer] + self.a[layer]
        return mx.concatenate([h, nn.silu(h)], axis=-1) @ self.W[layer] + self.b[layer]

    def scores(self, layer: int, x: Optional[mx.array] = None) -> mx.array:
        """[n_targets, E] for the last token of x ([D], [T, D] or [B, T, D]).

        Pure MLX, no host read: safe under `with mx.stream(s):` on a stream of its own.
        """
        if x is None:
            raise ValueError("LookaheadRouter.scores needs the layer's MoE input x")
        x = x.reshape(-1, x.shape[-1])[-1:]  # [1, D]: a matrix, as on every backend's matmul path
        return self._forward(layer, x).reshape(len(self.config.targets), self.config.num_experts)

    def scores_batch(self, layer: int, x: mx.array) -> mx.array:
        """[..., n_targets, E] for every row of x [..., D]."""
        s = self._forward(layer, x)
        return s.reshape(*x.shape[:-1], len(self.config.targets), self.config.num_experts)

    def top(self, layer: int, x: mx.array, k: int) -> mx.array:
        """[n_targets, k] expert ids, best first, computed on the device (one small read)."""
        s = self.scores(layer, x)
        return mx.argsort(-s, axis=-1)[:, :k]

    def __call__(self, x):
        """All layers at once: x [L, N, D] -> [L, N, n_targets * E]."""
        x = x.astype(self.A.dtype)
        if self._std is not None:
            x = (x - self._std[0][:, None, :]) * self._std[1][:, None, :]
        h = x @ self.A + self.a[:, None, :]
        return mx.concatenate([h, nn.silu(h)], axis=-1) @ self.W + self.b[:, None, :]

    def score_trace(self, seq):
        s = self(mx.array(seq.hidden))
        L, T = seq.hidden.shape[:2]
        return np.array(s).reshape(L, T, len(self.config.targets), self.config.num_experts)

    # -- initialisation --------------------------------------------------------------
    def set_standardisation(self, mu: np.ndarray, sigma: np.ndarray) -> None:
        """Standardise inputs (training): x -> (x - mu) / sigma, per layer."""
        inv = (1.0 / np.maximum(sigma, 1e-6)).astype(np.float32)
        object.__setattr__(self, "_std", (mx.array(mu.astype(np.float32)), mx.array(inv)))

    def fold_standardisation(self) -> None:
        """Fold the standardisation into A and a (same scores, one operation less per call)."""
        if self._std is None:
            return
        mu, inv = self._std
        A = self.A * inv[:, :, None]
        self.a = self.a - (mu[:, None, :] @ A)[:, 0, :]
        self.A = A
        object.__setattr__(self, "_std", None)
        mx.eval(self.A, self.a)

    def init_from_routers(self, routers) -> None:
        """Start from the cross-layer gates: truncated SVD of the routers in standardised coordinates."""
        c = self.config
        L, D, E, r = c.num_layers, c.hidden_size, c.num_experts, c.rank
        G = [np.array(_dense_router(rt)).astype(np.float64) for rt in routers]  # [E, D] each
        if self._std is None:
            mu, sigma = np.zeros((L, D)), np.ones((L, D))
        else:
            mu, sigma = np.array(self._std[0]), 1.0 / np.array(self._std[1])
        A = np.array(self.A)
        W = np.zeros((L, 2 * r, len(c.targets) * E), dtype=np.float32)
        b = np.zeros((L, len(c.targets) * E), dtype=np.float32)
        for layer in range(L):
            M = np.zeros((D, len(c.targets) * E), dtype=np.float64)
            for j, (dl, dt) in enumerate(c.targets):
                src = layer + dl
                if src < L:  # logits = x @ G^T = z @ (sigma * G^T) + mu @ G^T
                    M[:, j * E : (j + 1) * E] = G[src].T * sigma[layer][:, None]
                    b[layer, j * E : (j + 1) * E] = mu[layer] @ G[src].T
            U, S, Vt = np.linalg.svd(M, full_matrices=False)
            n = min(r, S.size)
            root = np.sqrt(S[:n])
            A[layer, :, :n] = U[:, :n] * root
            W[layer, :n] = root[:, None] * Vt[:n]
        self.A, self.a, self.W, self.b = mx.array(A), mx.zeros((L, r)), mx.array(W), mx.array(b)

    # -- files -----------------------------------------------------------------------
    def save(self, path) -> Path:
        """`path` (.safetensors, weights in float16; computed in float32 after loading) plus
        its config next to it (same name, .json)."""
        self.fold_standardisation()
        return _save_network(self, path, "lookahead", self.config, mx.float16)  # half the file

    @classmethod
    def load(cls, path, model=None, fingerprint: Optional[dict] = None) -> "LookaheadRouter":
        """Load a saved router; with `model` (or its `fingerprint`), refuse one trained for another model."""
        router = _load_network(cls, LookaheadConfig, path, "lookahead", model, fingerprint, mx.float32)
        mx.eval(router.parameters())
        return router


def lookahead_dataset(trace: RoutingTrace, targets=LOOKAHEAD_TARGETS):
    """X [L, N, D] float16 and labels Y [L, N, n_targets, k] int16 (-1 = no target there)."""
    xs, ys = [], []
    for seq in trace.sequences:
        if seq.hidden is None:
            raise ValueError("the trace has no hidden states (recorded with keep_hidden=False)")
        L, T, k = seq.experts.shape
        y = np.full((L, T, len(targets), k), -1, dtype=np.int16)
        for j, (dl, dt) in enumerate(targets):
            if dl < L and dt < T:
                y[: L - dl, : T - dt, j] = seq.experts[dl:, dt:]
        xs.append(seq.hidden)
        ys.append(y)
    return np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)


def _labels_to_dense(y: mx.array, E: int):
    """[L, B, nT, k] ids (-1 = none) -> multi-hot [L, B, nT, E] and mask [L, B, nT]."""
    valid = y[..., 0] >= 0
    hot = (y[..., None] == mx.arange(E)).any(axis=-2).astype(mx.float32)
    return hot, valid.astype(mx.float32)


def lookahead_loss(router: LookaheadRouter, x, y, loss: str = "bce"):
    c = router.config
    L, B = x.shape[:2]
    s = router(x).reshape(L, B, len(c.targets), c.num_experts)
    hot, mask = _labels_to_dense(y, c.num_experts)
    if loss == "bce":
        per = nn.losses.binary_cross_entropy(s, hot, with_logits=True, reduction="none").mean(-1)
    else:  # listwise: cross-entropy against the uniform distribution over the true top-k
        target = hot / mx.maximum(hot.sum(-1, keepdims=True), 1.0)
        per = -(target * nn.log_softmax(s, axis=-1)).sum(-1)
    return (per * mask).sum() / mx.maximum(mask.sum(), 1.0)


def _adamw_step(params: dict, grads: dict, state: dict, lr: float, wd: float, b1=0.9, b2=0.999, eps=1e-8):
    """One AdamW step (bias-corrected, decoupled weight decay) on numpy arrays, in place."""
    state["t"] = t = state.get("t", 0) + 1
    c1, c2 = 1 - b1**t, 1 - b2**t
    for k, g in grads.items():
        m = state.setdefault("m_" + k, np.zeros_like(g))
        v = state.setdefault("v_" + k, np.zeros_like(g))
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        p = params[k]
        p -= lr * ((m / c1) / (np.sqrt(v / c2) + eps) + wd * p)


def _np_lookahead_step(p: dict, x: np.ndarray, hot: np.ndarray, mask: np.ndarray, loss: str, grad: bool = True):
    """Loss (and gradients) of the lookahead router in numpy. x [L, B, D] standardised;
    hot [L, B, nT, E] 0/1; mask [L, B, nT]."""
    L, B, _ = x.shape
    nT, E = hot.shape[2], hot.shape[3]
    r = p["A"].shape[-1]
    h = np.matmul(x, p["A"]) + p["a"][:, None, :]
    sig = 1.0 / (1.0 + np.exp(-h))
    u = np.concatenate([h, h * sig], axis=-1)
    s = (np.matmul(u, p["W"]) + p["b"][:, None, :]).reshape(L, B, nT, E)
    n = max(float(mask.sum()), 1.0)
    if loss == "bce":
        per = (np.logaddexp(0.0, s) - hot * s).mean(-1)
        ds = (1.0 / (1.0 + np.exp(-s)) - hot) / E
    else:
        q = hot / np.maximum(hot.sum(-1, keepdims=True), 1.0)
        z = s - s.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        per = -(q * logp).sum(-1)
        ds = np.exp(logp) - q
    value = float((per * mask).sum() / n)
    if not grad:
        return value, None
    ds = (ds * (mask[..., None] / n)).reshape(L, B, nT * E).astype(np.float32)
    g = {"W": np.matmul(u.transpose(0, 2, 1), ds), "b": ds.sum(1)}
    du = np.matmul(ds, p["W"].transpose(0, 2, 1))
    dh = du[..., :r] + du[..., r:] * (sig * (1.0 + h * (1.0 - sig)))
    g["A"] = np.matmul(x.transpose(0, 2, 1), dh)
    g["a"] = dh.sum(1)
    return value, g


def _dense_labels_np(y: np.ndarray, E: int):
    """[..., k] ids (-1 = none) -> multi-hot [..., E] float32 and mask [...] float32."""
    valid = y[..., 0] >= 0
    hot = np.zeros(y.shape[:-1] + (E,), dtype=np.float32)
    np.put_along_axis(hot, np.maximum(y, 0).astype(np.int64), 1.0, axis=-1)
    hot *= valid[..., None]
    return hot, valid.astype(np.float32)


def train_lookahead(
    trace: RoutingTrace,
    *,
    routers=None,
    targets: Sequence[Target] = LOOKAHEAD_TARGETS,
    rank: int = 0,
    epochs: int = 8,
    batch_size: int = 256,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    loss: str = "bce",
    seed: int = 0,
    backend: str = "auto",
    progress: Optional[Callable[[int, int, float], None]] = None,
) -> tuple[LookaheadRouter, dict]:
    """Train a LookaheadRouter on `trace` (all positions, prompt and generated).

    routers: the model's routers (`traces.find_routers(model)`): start from the
        cross-layer gates; None: random start.
    loss: "bce" (multi-label, per expert) or "softmax" (cross-entropy against the uniform
        distribution over the true top-k).
    backend: "numpy" (float32 BLAS; MLX's CPU matmul is far slower), "mlx" (value_and_grad,
        for a GPU), "auto" = mlx on a GPU default device, numpy otherwise. Same math, AdamW
        with a cosine learning-rate decay.
    progress: called as progress(step, total_steps, running_loss).
    Returns (router, history): history = {"initial_loss", "final_loss", "loss": per-epoch means}.
    Same seed, same trace, same backend: same weights.
    """
    if loss not in ("bce", "softmax"):
        raise ValueError(f"loss must be 'bce' or 'softmax', not {loss!r}")
    if backend == "auto":
        backend = "numpy" if mx.default_device() == mx.cpu else "mlx"
    targets = [tuple(t) for t in targets]
    X, Y = lookahead_dataset(trace, targets)
    L, N, D = X.shape
    E = trace.num_experts
    cfg = LookaheadConfig(trace.num_layers, E, D, trace.top_k, targets, rank, dict(trace.fingerprint))
    mx.random.seed(seed)
    router = LookaheadRouter(cfg)
    xf = X.astype(np.float32)
    mu, sigma = xf.mean(1), xf.std(1)
    del xf
    router.set_standardisation(mu, sigma)
    if routers is not None:
        router.init_from_routers(routers)
    mx.eval(router.parameters())
    rng = np.random.default_rng(seed)
    steps_per_epoch = max(1, N // batch_size)
    total = steps_per_epoch * epochs
    lr_end = lr * 0.05

    def lr_at(step):  # cosine decay, as optim.cosine_decay
        return lr_end + 0.5 * (lr - lr_end) * (1 + np.cos(np.pi * min(step, total) / max(total, 1)))

    probe = rng.permutation(N)[: min(N, 2048)]
    history = {"loss": []}
    if backend == "numpy":
        inv = (1.0 / np.maximum(sigma, 1e-6)).astype(np.float32)
        p = {k: np.array(v, dtype=np.float32) for k, v in tree_flatten(router.parameters())}
        state: dict = {}

        def batch(idx):
            x = (X[:, idx].astype(np.float32) - mu[:, None, :]) * inv[:, None, :]
            hot, mask = _dense_labels_np(Y[:, idx], E)
            return x, hot, mask

        history["initial_loss"] = _np_lookahead_step(p, *batch(probe), loss, grad=False)[0]
        step = 0
        for _ in range(epochs):
            perm = rng.permutation(N)
            tot = 0.0
            for s in range(steps_per_epoch):
                value, g = _np_lookahead_step(p, *batch(perm[s * batch_size : (s + 1) * batch_size]), loss)
                _adamw_step(p, g, state, lr_at(step), weight_decay)
                tot += value
                step += 1
                if progress is not None:
                    progress(step, total, tot / (s + 1))
            history["loss"].append(tot / steps_per_epoch)
        history["final_loss"] = _np_lookahead_step(p, *batch(probe), loss, grad=False)[0]
        router.update({k: mx.array(v) for k, v in p.items()})
    elif backend == "mlx":
        opt = optim.AdamW(learning_rate=lambda s: mx.array(lr_at(int(s)), dtype=mx.float32), weight_decay=weight_decay)
        loss_and_grad = nn.value_and_grad(router, lambda m, x, y: lookahead_loss(m, x, y, loss))
        Xm, Ym = mx.array(X), mx.array(Y.astype(np.int32))  # X stays float16 until batched
        pm = mx.array(probe)
        history["initial_loss"] = lookahead_loss(router, Xm[:, pm], Ym[:, pm], loss).item()
        step = 0
        for _ in range(epochs):
            perm = rng.permutation(N)
            tot = 0.0
            for s in range(steps_per_epoch):
                idx = mx.array(perm[s * batch_size : (s + 1) * batch_size])
                value, grads = loss_and_grad(router, Xm[:, idx], Ym[:, idx])
                opt.update(router, grads)
                mx.eval(router.parameters(), opt.state, value)
                tot += value.item()
                step += 1
                if progress is not None:
                    progress(step, total, tot / (s + 1))
            history["loss"].append(tot / steps_per_epoch)
        history["final_loss"] = lookahead_loss(router, Xm[:, pm], Ym[:, pm], loss).item()
    else:
        raise ValueError(f"backend must be 'auto', 'numpy' or 'mlx', not {backend!r}")
    router.fold_standardisation()
    router.config.meta.update(
        epochs=epochs, seed=seed, loss=loss, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
        backend=backend, train_tokens=int(N), train_sequences=len(trace),
        init="routers" if routers is not None else "random",
    )
    return router, history
