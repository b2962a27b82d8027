"""MarkovPredictor: a 2nd-order Markov chain over expert ids, fit from routing traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from ..errors import ProfileError
from ..traces import RoutingTrace
from .base import FORMAT_VERSION, Predictor, TOKEN_TARGETS, _as_ids, _check_model, _read_npz


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
