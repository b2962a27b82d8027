"""What every expert predictor shares: targets, the `Predictor` interface, id helpers and
the checked reading and writing of predictor files."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..errors import ProfileError
from ..traces import check_fingerprint, model_fingerprint, SequenceTrace


Target = tuple[int, int]

LOOKAHEAD_TARGETS: tuple[Target, ...] = ((1, 0), (2, 0), (0, 1), (0, 2))

TOKEN_TARGETS: tuple[Target, ...] = ((0, 1), (0, 2))

TARGET_NAMES = {(1, 0): "next layer", (2, 0): "2 layers ahead", (0, 1): "next token", (0, 2): "2 tokens ahead"}

FORMAT_VERSION = 1


def target_name(t: Target) -> str:
    return TARGET_NAMES.get(tuple(t), f"layer+{t[0]}, token+{t[1]}")


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


def _save_network(net: nn.Module, path, kind: str, config, dtype=None) -> Path:
    """A trained predictor network's weights (`path`, safetensors, cast to `dtype` if given)
    and its config (same name, .json), each written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) if dtype is not None else v for k, v in tree_flatten(net.parameters())}
    tmp = path.with_name(path.stem + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), weights, metadata={"kind": kind})
    tmp.replace(path)
    _write_json(path.with_suffix(".json"), dict(asdict(config), kind=kind, version=FORMAT_VERSION))
    return path


def _load_network(cls, config_cls, path, kind: str, model=None, fingerprint: Optional[dict] = None, dtype=None):
    """The network `_save_network` wrote, built from its config and checked against `model`
    (or its fingerprint): ProfileError for a missing, corrupt or mismatched file."""
    path = Path(path)
    cfg = _read_json(path.with_suffix(".json"), kind)
    _check_model(cfg, model, fingerprint, path)
    try:
        net = cls(config_cls(**{k: v for k, v in cfg.items() if k not in ("kind", "version")}))
    except TypeError as e:
        raise ProfileError(f"{path.with_suffix('.json')}: bad {kind} config ({e})") from None
    weights = _read_safetensors(path)
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    try:
        net.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ProfileError(f"{path}: weights do not match its config ({e})") from None
    return net
