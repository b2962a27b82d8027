"""Expert predictors: which experts a MoE layer will need, before its router has run.

Every predictor has the same small interface (see `Predictor`):

- `targets`: the (layer_offset, token_offset) pairs it predicts. (1, 0) and (2, 0) are the
  next MoE layers of the same token, (0, 1) and (0, 2) the same layer of the next tokens.
- `scores(layer, x=None) -> mx.array [n_targets, E]`: higher = more likely, one row per
  target, for the latest token. `x` is layer `layer`'s MoE input (what the expert module
  receives; [D] or [..., D], the last row is used); predictors that work from routing
  history (`needs_hidden = False`) ignore it. Rows whose target layer is past the last MoE
  layer are meaningless: `valid(layer)` says which rows count.
- `ranked(layer, x=None, k=None) -> {(target_layer, token_offset): np.ndarray of expert ids}`,
  best first; `row(layer_offset, token_offset)` is the row of a target in `scores`.
- `observe(layer, expert_ids)` / `reset()`: the Runtime observer protocol (routing decisions
  known on the host; ids of one or more tokens, flattened). History-based predictors
  (previous token, Markov) learn the context from it; the others ignore it.
- `score_trace(seq) -> np.ndarray [L, T, n_targets, E]`: offline scores of a recorded
  sequence, row t using only what is known at token t (for evaluation and training).

Predictors:
- `PreviousTokenPredictor`: the experts of the latest tokens (no training).
- `CrossLayerGatePredictor`: layer l+j's router applied to layer l's MoE input (no training).
- `MarkovPredictor`: 2nd-order Markov chain over expert ids, fit from traces.
- `LookaheadRouter`: a small trained network per MoE layer (nn.Module), all four targets.
- `IntentClassifier`: at prefill, the experts the whole generation will use, per layer.

Library code: nothing here prints; long work reports through `progress` callbacks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .errors import ProfileError
from .traces import RoutingTrace, SequenceTrace, check_fingerprint, find_routers, model_fingerprint

Target = tuple[int, int]
LOOKAHEAD_TARGETS: tuple[Target, ...] = ((1, 0), (2, 0), (0, 1), (0, 2))
TOKEN_TARGETS: tuple[Target, ...] = ((0, 1), (0, 2))
TARGET_NAMES = {(1, 0): "next layer", (2, 0): "2 layers ahead", (0, 1): "next token", (0, 2): "2 tokens ahead"}
FORMAT_VERSION = 1


def target_name(t: Target) -> str:
    return TARGET_NAMES.get(tuple(t), f"layer+{t[0]}, token+{t[1]}")


# --------------------------------------------------------------------------------------
# Common interface
# --------------------------------------------------------------------------------------


class Predictor:
    """Interface shared by all predictors (see the module docstring)."""

    name = "predictor"
    needs_hidden = False
    targets: tuple[Target, ...] = ()
    num_layers = 0
    num_experts = 0
    top_k = 0

    def reset(self) -> None:
        """Forget the routing history (a new, unrelated sequence starts)."""

    def observe(self, layer: int, expert_ids) -> None:
        """Routing of `layer` for one or more tokens (flattened top-k ids, in token order)."""

    def scores(self, layer: int, x: Optional[mx.array] = None) -> mx.array:
        raise NotImplementedError

    def score_trace(self, seq: SequenceTrace) -> np.ndarray:
        raise NotImplementedError

    def row(self, layer_offset: int, token_offset: int) -> int:
        return list(self.targets).index((layer_offset, token_offset))

    def valid(self, layer: int) -> list[bool]:
        return [layer + dl < self.num_layers for dl, _ in self.targets]

    def ranked(self, layer: int, x: Optional[mx.array] = None, k: Optional[int] = None) -> dict:
        """{(target_layer, token_offset): expert ids, best first} for the valid targets."""
        s = np.array(self.scores(layer, x).astype(mx.float32))
        k = k or self.num_experts
        out = {}
        for j, ((dl, dt), ok) in enumerate(zip(self.targets, self.valid(layer))):
            if ok:
                out[(layer + dl, dt)] = top_ids(s[j], k)
        return out


def top_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best ids along the last axis, best first (ties: lower id first)."""
    k = min(k, scores.shape[-1])
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k]


def _as_ids(expert_ids, top_k: int) -> np.ndarray:
    a = np.asarray(expert_ids).reshape(-1)
    if top_k and a.size % top_k == 0:
        return a.reshape(-1, top_k).astype(np.int64)
    return a.reshape(1, -1).astype(np.int64)


def _multi_hot(ids: np.ndarray, E: int) -> np.ndarray:
    """[..., k] ids -> [..., E] float32 0/1."""
    out = np.zeros(ids.shape[:-1] + (E,), dtype=np.float32)
    np.put_along_axis(out, ids.astype(np.int64), 1.0, axis=-1)
    return out


# --------------------------------------------------------------------------------------
# Baselines without training
# --------------------------------------------------------------------------------------


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
        x = x.reshape(-1, x.shape[-1])[-1:]  # [1, D]: quantized matmuls want a matrix (CUDA)
        return self._logits(layer, x.astype(mx.float32))[0]

    def score_trace(self, seq):
        out = []
        for layer in range(self.num_layers):
            x = mx.array(seq.hidden[layer]).astype(mx.float32)
            out.append(np.array(self._logits(layer, x)))
        return np.stack(out)


# --------------------------------------------------------------------------------------
# Markov chain over expert ids
# --------------------------------------------------------------------------------------


class MarkovPredictor(Predictor):
    """2nd-order Markov chain over expert ids, per MoE layer, fit from traces.

    For a token target (0, dt): the state is the experts of the last two tokens at this
    layer (A = token t, B = token t-1) and score(e') = sum over a in A, b in B of
    P(e' used at t+dt | a at t, b at t-1), estimated from counts with back-off to
    P(e' | a) and to the layer's expert frequencies. For a layer target (dl, 0) the state
    is the current token's experts at this layer and at the layer before (usable only
    when the runtime reads each layer's routing as it happens).
    """

    name = "markov"

    def __init__(self, num_layers, num_experts, top_k, targets=TOKEN_TARGETS, smoothing=(4.0, 4.0)):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.targets = tuple(tuple(t) for t in targets)
        for dl, dt in self.targets:
            if (dl == 0) == (dt == 0) or dl < 0 or dt < 0:
                raise ValueError(f"Markov targets are (0, dt) or (dl, 0) with a positive offset, not {(dl, dt)}")
        self.smoothing = tuple(smoothing)
        L, E, n = num_layers, num_experts, len(self.targets)
        self.c0 = np.zeros((L, E), dtype=np.float64)
        self.c1 = np.zeros((L, n, E, E), dtype=np.float64)
        self.c2 = np.zeros((L, n, E, E, E), dtype=np.float64)
        self.meta: dict = {}
        self._tables = None
        self.reset()

    # -- fitting ---------------------------------------------------------------------
    def fit(self, trace: RoutingTrace, progress: Optional[Callable[[int, int], None]] = None) -> "MarkovPredictor":
        E = self.num_experts
        n = len(trace.sequences)
        for i, seq in enumerate(trace.sequences):
            ex = seq.experts.astype(np.int64)  # [L, T, k]
            L, T, k = ex.shape
            for layer in range(L):
                self.c0[layer] += np.bincount(ex[layer].reshape(-1), minlength=E)
                for j, (dl, dt) in enumerate(self.targets):
                    A, B, C = self._states(ex, layer, dl, dt)
                    if A is None:
                        continue
                    # first order: a -> c
                    idx1 = (A[:, :, None] * E + C[:, None, :]).reshape(-1)
                    self.c1[layer, j] += np.bincount(idx1, minlength=E * E).reshape(E, E)
                    if B is None:
                        continue
                    m = min(len(B), len(A))
                    A2, C2, B2 = A[-m:], C[-m:], B[-m:]
                    idx2 = (
                        (A2[:, :, None, None] * E + B2[:, None, :, None]) * E + C2[:, None, None, :]
                    ).reshape(-1)
                    self.c2[layer, j] += np.bincount(idx2, minlength=E**3).reshape(E, E, E)
            if progress is not None:
                progress(i + 1, n)
        self._tables = None
        self.meta["fit_tokens"] = self.meta.get("fit_tokens", 0) + trace.num_tokens
        return self

    @staticmethod
    def _states(ex, layer, dl, dt):
        """Aligned (A, B, C): conditioning sets (latest, older) and target sets, over t."""
        L, T, _ = ex.shape
        if dt:
            if T <= dt:
                return None, None, None
            A = ex[layer, : T - dt]  # token t
            C = ex[layer, dt:]  # token t+dt
            B = ex[layer, : T - dt - 1] if T - dt - 1 > 0 else None  # token t-1, aligned to t>=1
            return A, B, C
        if layer + dl >= L:
            return None, None, None
        A, C = ex[layer], ex[layer + dl]
        B = ex[layer - 1] if layer > 0 else None
        return A, B, C

    # -- probabilities ---------------------------------------------------------------
    def tables(self):
        """Smoothed P2 [L, n, E, E, E] and P1 [L, n, E, E] (float32), computed once."""
        if self._tables is None:
            lam, mu = self.smoothing
            E = self.num_experts
            p0 = (self.c0 + 1.0) / (self.c0.sum(-1, keepdims=True) + E)  # [L, E]
            n1 = self.c1.sum(-1, keepdims=True)
            p1 = (self.c1 + mu * p0[:, None, None, :]) / (n1 + mu)
            n2 = self.c2.sum(-1, keepdims=True)
            p2 = (self.c2 + lam * p1[:, :, :, None, :]) / (n2 + lam)
            self._tables = (p2.astype(np.float32), p1.astype(np.float32))
        return self._tables

    def _score(self, layer, j, A, B) -> np.ndarray:
        p2, p1 = self.tables()
        if A is None or len(A) == 0:
            return np.zeros(self.num_experts, dtype=np.float32)
        if B is None or len(B) == 0:
            return p1[layer, j][A].sum(0)
        return p2[layer, j][A][:, B].sum((0, 1))

    # -- runtime ---------------------------------------------------------------------
    def reset(self):
        self._hist = [np.zeros((0, self.top_k), dtype=np.int64) for _ in range(self.num_layers)]

    def observe(self, layer, expert_ids):
        ids = _as_ids(expert_ids, self.top_k)
        self._hist[layer] = np.concatenate([self._hist[layer], ids])[-2:]

    def scores(self, layer, x=None):
        h = self._hist[layer]
        rows = []
        for j, (dl, dt) in enumerate(self.targets):
            if dt:
                A = h[-1] if len(h) else None
                B = h[-2] if len(h) > 1 else None
            else:
                if layer + dl >= self.num_layers:
                    rows.append(np.zeros(self.num_experts, dtype=np.float32))
                    continue
                A = h[-1] if len(h) else None
                prev = self._hist[layer - 1] if layer > 0 else []
                B = prev[-1] if len(prev) else None
            rows.append(self._score(layer, j, A, B))
        return mx.array(np.stack(rows))

    def score_trace(self, seq):
        ex = seq.experts.astype(np.int64)
        L, T, _ = ex.shape
        p2, p1 = self.tables()
        out = np.zeros((L, T, len(self.targets), self.num_experts), dtype=np.float32)
        for layer in range(L):
            for j, (dl, dt) in enumerate(self.targets):
                if layer + dl >= L:
                    continue
                A = ex[layer]
                if dt:
                    out[layer, 0, j] = p1[layer, j][A[0]].sum(0)
                    if T > 1:
                        out[layer, 1:, j] = p2[layer, j][A[1:, :, None], ex[layer, :-1, None, :]].sum((1, 2))
                elif layer == 0:
                    out[layer, :, j] = p1[layer, j][A].sum(1)
                else:
                    out[layer, :, j] = p2[layer, j][A[:, :, None], ex[layer - 1, :, None, :]].sum((1, 2))
        return out

    # -- files -----------------------------------------------------------------------
    def save(self, path, fingerprint: Optional[dict] = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            "kind": "markov",
            "version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "targets": [list(t) for t in self.targets],
            "smoothing": list(self.smoothing),
            "fingerprint": fingerprint or self.meta.get("fingerprint", {}),
            "meta": self.meta,
        }
        big = max(self.c2.max(initial=0), self.c1.max(initial=0), self.c0.max(initial=0))
        cdt = np.uint16 if big < 2**16 else np.uint32
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            c0=self.c0.astype(np.uint32),
            c1=self.c1.astype(np.uint32),
            c2=self.c2.astype(cdt),
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path, model=None, fingerprint: Optional[dict] = None) -> "MarkovPredictor":
        path = Path(path)
        header, arrays = _read_npz(path, "markov", ("c0", "c1", "c2"))
        p = cls(header["num_layers"], header["num_experts"], header["top_k"], [tuple(t) for t in header["targets"]],
                tuple(header["smoothing"]))
        _check_model(header, model, fingerprint, path)
        p.c0, p.c1, p.c2 = (arrays[k].astype(np.float64) for k in ("c0", "c1", "c2"))
        if p.c2.shape != (p.num_layers, len(p.targets)) + (p.num_experts,) * 3:
            raise ProfileError(f"{path}: Markov tables have the wrong shape")
        p.meta = dict(header.get("meta", {}), fingerprint=header.get("fingerprint", {}))
        return p


def _read_npz(path: Path, kind: str, keys) -> tuple[dict, dict]:
    if not path.exists():
        raise ProfileError(f"{path}: no such predictor file")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            arrays = {k: z[k] for k in keys}
    except Exception as e:
        raise ProfileError(f"{path}: corrupt or truncated predictor file ({type(e).__name__})") from None
    if header.get("kind") != kind or header.get("version") != FORMAT_VERSION:
        raise ProfileError(f"{path}: not a {kind} predictor (version {FORMAT_VERSION})")
    return header, arrays


def _check_model(header: dict, model, fingerprint: Optional[dict], path) -> None:
    if fingerprint is None and model is not None:
        fingerprint = model_fingerprint(model)
    if fingerprint is not None:
        check_fingerprint(header.get("fingerprint", {}), fingerprint, f"{Path(path).name}")


# --------------------------------------------------------------------------------------
# Lookahead router
# --------------------------------------------------------------------------------------


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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = {k: v.astype(mx.float16) for k, v in tree_flatten(self.parameters())}  # half the file
        tmp = path.with_name(path.stem + ".tmp.safetensors")
        mx.save_safetensors(str(tmp), weights, metadata={"kind": "lookahead"})
        tmp.replace(path)
        cfg = dict(asdict(self.config), kind="lookahead", version=FORMAT_VERSION)
        _write_json(path.with_suffix(".json"), cfg)
        return path

    @classmethod
    def load(cls, path, model=None, fingerprint: Optional[dict] = None) -> "LookaheadRouter":
        """Load a saved router; with `model` (or its `fingerprint`), refuse one trained for another model."""
        path = Path(path)
        cfg = _read_json(path.with_suffix(".json"), "lookahead")
        _check_model(cfg, model, fingerprint, path)
        cfg = {k: v for k, v in cfg.items() if k not in ("kind", "version")}
        try:
            router = cls(LookaheadConfig(**cfg))
        except TypeError as e:
            raise ProfileError(f"{path.with_suffix('.json')}: bad lookahead config ({e})") from None
        weights = {k: v.astype(mx.float32) for k, v in _read_safetensors(path).items()}
        try:
            router.load_weights(list(weights.items()), strict=True)
        except ValueError as e:
            raise ProfileError(f"{path}: weights do not match its config ({e})") from None
        mx.eval(router.parameters())
        return router


def _dense_router(router) -> mx.array:
    """A router's weight as float32 [E, D] (dequantised if need be)."""
    m = router.module
    if router.kind == "linear" and isinstance(m, nn.QuantizedLinear):
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, mode=getattr(m, "mode", "affine"))
    else:
        w = m.weight
    return w.astype(mx.float32)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)


def _read_json(path: Path, kind: str) -> dict:
    if not path.exists():
        raise ProfileError(f"{path}: no such predictor config")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProfileError(f"{path}: corrupt predictor config ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or cfg.get("kind") != kind or cfg.get("version") != FORMAT_VERSION:
        raise ProfileError(f"{path}: not a {kind} predictor config (version {FORMAT_VERSION})")
    return cfg


def _read_safetensors(path: Path) -> dict:
    if not path.exists():
        raise ProfileError(f"{path}: no such predictor file")
    try:
        return mx.load(str(path))
    except Exception as e:
        raise ProfileError(f"{path}: corrupt or truncated predictor weights ({type(e).__name__})") from None


# -- training data ----------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Intent classifier
# --------------------------------------------------------------------------------------


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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.safetensors")
        mx.save_safetensors(str(tmp), dict(tree_flatten(self.parameters())), metadata={"kind": "intent"})
        tmp.replace(path)
        _write_json(path.with_suffix(".json"), dict(asdict(self.config), kind="intent", version=FORMAT_VERSION))
        return path

    @classmethod
    def load(cls, path, model=None, fingerprint: Optional[dict] = None) -> "IntentClassifier":
        path = Path(path)
        cfg = _read_json(path.with_suffix(".json"), "intent")
        _check_model(cfg, model, fingerprint, path)
        try:
            ic = cls(IntentConfig(**{k: v for k, v in cfg.items() if k not in ("kind", "version")}))
        except TypeError as e:
            raise ProfileError(f"{path.with_suffix('.json')}: bad intent config ({e})") from None
        try:
            ic.load_weights(list(_read_safetensors(path).items()), strict=True)
        except ValueError as e:
            raise ProfileError(f"{path}: weights do not match its config ({e})") from None
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


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Files of a model's predictors
# --------------------------------------------------------------------------------------

LOOKAHEAD_FILE = "lookahead.safetensors"
MARKOV_FILE = "markov.npz"
INTENT_FILE = "intent.safetensors"


def profiles_root() -> Path:
    """$CHRONOS_PROFILE_DIR if set, else the shipped <repo>/profiles."""
    import os

    env = os.environ.get("CHRONOS_PROFILE_DIR")
    if env:
        return Path(env).expanduser()
    return shipped_profiles_root()


def shipped_profiles_root() -> Path:
    import chronos_mlx

    return Path(chronos_mlx.__file__).resolve().parent.parent / "profiles"


def model_name(spec=None) -> str:
    """demo-moe-4bit for the embedded model (None / "demo"), a local model's directory name,
    the last part of a Hugging Face repo id."""
    from .loader import DEFAULT_MODEL

    if spec is None or str(spec) in ("", "demo"):
        return DEFAULT_MODEL.name
    p = Path(str(spec)).expanduser()
    if p.exists():
        return p.resolve().name
    return str(spec).rstrip("/").split("/")[-1]


def predictor_dir(spec=None) -> Path:
    """Where `chronos predictor train` saves a model's predictors: <profiles>/<model-name>/predictors/."""
    return profiles_root() / model_name(spec) / "predictors"


def find_predictor_dir(spec=None) -> Optional[Path]:
    """The first of $CHRONOS_PROFILE_DIR/<model>/predictors and <repo>/profiles/<model>/predictors
    that holds a trained predictor, or None."""
    name = model_name(spec)
    for root in dict.fromkeys([profiles_root(), shipped_profiles_root()]):
        d = root / name / "predictors"
        if any((d / f).exists() for f in (LOOKAHEAD_FILE, MARKOV_FILE, INTENT_FILE)):
            return d
    return None


def load_predictors(directory, model=None, fingerprint: Optional[dict] = None) -> dict:
    """The trained predictors found in `directory`: {"lookahead"?, "markov"?, "intent"?}.

    With `model` (or its fingerprint), each is checked against it (ProfileError on mismatch).
    """
    d = Path(directory)
    if fingerprint is None and model is not None:
        fingerprint = model_fingerprint(model)
    out = {}
    if (d / LOOKAHEAD_FILE).exists():
        out["lookahead"] = LookaheadRouter.load(d / LOOKAHEAD_FILE, fingerprint=fingerprint)
    if (d / MARKOV_FILE).exists():
        out["markov"] = MarkovPredictor.load(d / MARKOV_FILE, fingerprint=fingerprint)
    if (d / INTENT_FILE).exists():
        out["intent"] = IntentClassifier.load(d / INTENT_FILE, fingerprint=fingerprint)
    return out
