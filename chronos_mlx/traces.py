"""Routing traces recorded from the model itself: what each MoE layer saw and chose, per token.

`record_traces` wraps every MoE layer's expert module (mlx_lm's SwitchGLU / SwitchMLP, or
chronos's StreamingSwitch; all are called as `module(x, indices)`) in a thin recorder,
runs greedy generation with `mlx_lm.generate.generate_step`, and keeps, per sequence,
per MoE layer and per token position, the MoE input `x` (float16) and the router's top-k
expert ids. Positions are in sequence order: the prompt's tokens, then the generated
ones (`SequenceTrace.n_prompt` says where the prompt ends). The wrappers are removed
afterwards; the model is left as it was.

Also here: finding the MoE layers and their routers in any mlx_lm model, and the model
fingerprint that trained predictors carry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from .errors import ChronosError, ProfileError

TRACE_VERSION = 1
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


class TraceError(ChronosError):
    """A trace file is missing, corrupt or was recorded from another model; or prompts are unusable."""


# --------------------------------------------------------------------------------------
# MoE layers, routers and the model fingerprint
# --------------------------------------------------------------------------------------


def _expert_types():
    from .streaming import StreamingSwitch

    return (SwitchGLU, SwitchMLP, StreamingSwitch, _Recorder)


def _layer_key(name: str):
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def moe_modules(model) -> list[tuple[str, nn.Module]]:
    """(path, expert module) of every MoE layer, in layer order."""
    types = _expert_types()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    # A recorder's inner module is listed too: keep the outermost.
    found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]
    return sorted(found, key=lambda nm: _layer_key(nm[0]))


@dataclass
class Router:
    """One MoE layer's router as a plain linear map: logits = x @ weight.T (+ bias)."""

    path: str
    module: nn.Module  # the model's own module (shared, not copied)
    kind: str  # "linear" (Linear / QuantizedLinear, called as is), "weight" (custom gate with .weight)
    num_experts: int

    def logits(self, x: mx.array) -> mx.array:
        if self.kind == "linear":
            return self.module(x)
        w = self.module.weight
        return x @ w.astype(x.dtype).T


def _as_router(path: str, module, num_experts: Optional[int]) -> Optional[Router]:
    if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        out = module.weight.shape[0]
        if num_experts is None or out == num_experts:
            return Router(path, module, "linear", out)
        return None
    inner = getattr(module, "layer", None)  # granitemoe: GraniteMoeTopKGating.layer
    if isinstance(inner, (nn.Linear, nn.QuantizedLinear)):
        return _as_router(path + ".layer", inner, num_experts)
    w = module.get("weight") if isinstance(module, nn.Module) else None
    if isinstance(w, mx.array) and w.ndim == 2 and (num_experts is None or w.shape[0] == num_experts):
        return Router(path, module, "weight", w.shape[0])  # deepseek-style MoEGate
    return None


def model_num_experts(model) -> Optional[int]:
    args = getattr(model, "args", None)
    for src in (args, getattr(args, "text_config", None)):
        if src is None:
            continue
        get = src.get if isinstance(src, dict) else (lambda k, s=src: getattr(s, k, None))
        for key in _EXPERT_KEYS:
            v = get(key)
            if isinstance(v, int) and v > 0:
                return v
    return None


def find_routers(model) -> list[Router]:
    """The router of every MoE layer (same order as `moe_modules`).

    The router is the expert module's sibling named `gate` or `router`: an nn.Linear /
    QuantizedLinear with num_experts outputs, or a custom gate with a `.weight` (deepseek).
    Raises ModelError-like TraceError if a MoE layer has none.
    """
    modules = dict(model.named_modules())
    E = model_num_experts(model)
    routers = []
    for name, _ in moe_modules(model):
        parent_path = name.rsplit(".", 1)[0] if "." in name else ""
        parent = modules.get(parent_path, model)
        router = None
        for sib in ("gate", "router"):
            child = parent.get(sib) if isinstance(parent, nn.Module) else None
            if isinstance(child, nn.Module):
                router = _as_router(f"{parent_path}.{sib}", child, E)
                if router is not None:
                    break
        if router is None:
            raise TraceError(f"{name}: no router found next to the expert module (looked for 'gate' / 'router')")
        routers.append(router)
    return routers


def _canonical_bytes(a: mx.array) -> bytes:
    """Bytes that do not depend on the compute dtype the model was cast to."""
    if mx.issubdtype(a.dtype, mx.floating):
        a = a.astype(mx.float16)
    return np.array(a).tobytes()


def model_fingerprint(model) -> dict:
    """What a trained predictor is tied to: architecture, geometry and the routers' weights.

    The sha256 covers every router parameter (integers as stored, floats rounded to float16,
    so `set_dtype(float32)` or chronos's float32 load do not change it).
    """
    switches = moe_modules(model)
    routers = find_routers(model)
    h = hashlib.sha256()
    for r in routers:
        for key, arr in sorted(_flat_params(r.module).items()):
            h.update(key.encode())
            h.update(str(tuple(arr.shape)).encode())
            h.update(_canonical_bytes(arr))
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", None)
    if hidden is None and routers:
        r = routers[0]
        w = r.module.weight
        hidden = w.shape[1] * 32 // r.module.bits if isinstance(r.module, nn.QuantizedLinear) else w.shape[1]
    return {
        "model_type": getattr(model, "model_type", None) or getattr(args, "model_type", None),
        "num_layers": len(switches),
        "num_experts": routers[0].num_experts if routers else model_num_experts(model),
        "hidden_size": int(hidden) if hidden is not None else None,
        "router_sha256": h.hexdigest(),
    }


def _flat_params(module) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(module.parameters()))


def check_fingerprint(expected: dict, actual: dict, what: str = "predictor") -> None:
    """ProfileError unless `actual` (this model) matches `expected` (what `what` was made for)."""
    keys = ("model_type", "num_layers", "num_experts", "hidden_size", "router_sha256")
    diff = [k for k in keys if expected.get(k) != actual.get(k)]
    if diff:
        k = diff[0]
        raise ProfileError(
            f"{what} was trained for another model ({k}: {expected.get(k)!s:.16} here {actual.get(k)!s:.16})"
        )


# --------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------


@dataclass
class SequenceTrace:
    """One prompt and its greedy continuation, as the MoE layers saw it."""

    tokens: np.ndarray  # [T] int32: prompt tokens then generated tokens
    n_prompt: int
    experts: np.ndarray  # [L, T, k] int16: router top-k per MoE layer and position
    hidden: Optional[np.ndarray]  # [L, T, D] float16: MoE input, or None when not kept

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def generated(self) -> np.ndarray:
        """Boolean mask [T] of generated positions."""
        m = np.zeros(self.length, dtype=bool)
        m[self.n_prompt :] = True
        return m


@dataclass
class RoutingTrace:
    """Routing traces of a set of sequences from one model."""

    sequences: list[SequenceTrace]
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    fingerprint: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.sequences)

    def subset(self, idx: Sequence[int]) -> "RoutingTrace":
        return RoutingTrace(
            [self.sequences[i] for i in idx],
            self.num_layers,
            self.num_experts,
            self.top_k,
            self.hidden_size,
            dict(self.fingerprint),
            dict(self.meta),
        )

    def save(self, path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        lengths = np.array([s.length for s in self.sequences], dtype=np.int64)
        keep_hidden = all(s.hidden is not None for s in self.sequences) and self.sequences
        arrays = {
            "lengths": lengths,
            "n_prompt": np.array([s.n_prompt for s in self.sequences], dtype=np.int64),
            "tokens": _cat([s.tokens for s in self.sequences], 0, np.int32),
            "experts": _cat([s.experts for s in self.sequences], 1, np.int16),
        }
        if keep_hidden:
            arrays["hidden"] = _cat([s.hidden for s in self.sequences], 1, np.float16)
        header = {
            "version": TRACE_VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
            "fingerprint": self.fingerprint,
            "meta": self.meta,
        }
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "RoutingTrace":
        path = Path(path)
        if not path.exists():
            raise TraceError(f"{path}: no such trace file")
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
                lengths = z["lengths"]
                n_prompt = z["n_prompt"]
                tokens = z["tokens"]
                experts = z["experts"]
                hidden = z["hidden"] if "hidden" in z.files else None
        except TraceError:
            raise
        except Exception as e:
            raise TraceError(f"{path}: not a routing trace ({type(e).__name__}: {e})") from None
        if header.get("version") != TRACE_VERSION:
            raise TraceError(f"{path}: trace version {header.get('version')}, expected {TRACE_VERSION}")
        ends = np.cumsum(lengths)
        if ends.size and (ends[-1] != tokens.shape[0] or experts.shape[1] != tokens.shape[0]):
            raise TraceError(f"{path}: truncated or inconsistent trace")
        seqs = []
        start = 0
        for n, p in zip(lengths.tolist(), n_prompt.tolist()):
            sl = slice(start, start + n)
            seqs.append(
                SequenceTrace(
                    tokens[sl], int(p), experts[:, sl], hidden[:, sl] if hidden is not None else None
                )
            )
            start += n
        return cls(
            seqs,
            header["num_layers"],
            header["num_experts"],
            header["top_k"],
            header["hidden_size"],
            header.get("fingerprint", {}),
            header.get("meta", {}),
        )


def _cat(parts, axis, dtype):
    if not parts:
        return np.zeros((0,), dtype=dtype)
    return np.concatenate([np.asarray(p, dtype=dtype) for p in parts], axis=axis)


class _Recorder(nn.Module):
    """Calls the wrapped expert module unchanged; remembers (x, indices) of every call."""

    def __init__(self, inner, layer: int, sink: list):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_sink", sink)

    def __call__(self, x, indices):
        self._sink.append((self._layer, x, indices))
        return self.inner(x, indices)


def _encode(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special))
    return [int(t) for t in prompt]


def record_traces(
    model,
    tokenizer,
    prompts: Sequence,
    max_tokens: int = 32,
    *,
    max_prompt_tokens: Optional[int] = None,
    keep_hidden: bool = True,
    stop_at_eos: bool = True,
    progress: Optional[Callable[[int, int], None]] = None,
) -> RoutingTrace:
    """Record the routing of greedy generation on `prompts` (strings or token-id lists).

    model: an mlx_lm model (stock, e.g. `mlx_lm.load` + `set_dtype(mx.float32)`, or one from
        `chronos_mlx.load`). Its expert modules are wrapped for the duration of the call.
    max_prompt_tokens: keep only the first N tokens of each prompt (None: all).
    keep_hidden: store the MoE inputs (needed to train the lookahead router / intent model).
    progress: called as progress(tokens_done, tokens_total) as positions are processed.
    Deterministic: greedy decoding, no sampling.
    """
    from mlx_lm.generate import generate_step

    switches = moe_modules(model)
    if not switches:
        raise TraceError("the model has no MoE layers: nothing to record")
    encoded = []
    for p in prompts:
        ids = _encode(tokenizer, p)
        if max_prompt_tokens:
            ids = ids[:max_prompt_tokens]
        if len(ids) < 1:
            raise TraceError("empty prompt: nothing to record")
        encoded.append(ids)
    fingerprint = model_fingerprint(model)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    total = sum(len(ids) + max_tokens for ids in encoded)
    done = 0
    sink: list = []
    wrapped = [(name, _Recorder(m, i, sink)) for i, (name, m) in enumerate(switches)]
    model.update_modules(tree_unflatten(wrapped))
    L = len(switches)
    sequences = []
    top_k = hidden = None
    try:
        for ids in encoded:
            sink.clear()
            out = []
            for tok, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
                out.append(int(tok))
                done += len(ids) if len(out) == 1 else 1
                if progress is not None:
                    progress(done, total)
                if stop_at_eos and int(tok) in eos:
                    break
            done += max_tokens - len(out)
            tokens = np.array(ids + out, dtype=np.int32)
            per_layer_x = [[] for _ in range(L)]
            per_layer_i = [[] for _ in range(L)]
            mx.eval([a for _, x, i in sink for a in ((x, i) if keep_hidden else (i,))])
            for layer, x, inds in sink:
                k = inds.shape[-1]
                per_layer_i[layer].append(np.array(inds).reshape(-1, k))
                if keep_hidden:
                    per_layer_x[layer].append(np.array(x.astype(mx.float16)).reshape(-1, x.shape[-1]))
            sink.clear()
            # generate_step processes the prompt, then each generated token (the last one
            # too, by its speculative extra step); an early break may leave that step out.
            T = min(len(tokens), min(sum(a.shape[0] for a in per_layer_i[l]) for l in range(L)))
            experts = np.stack([np.concatenate(per_layer_i[l])[:T] for l in range(L)]).astype(np.int16)
            top_k = experts.shape[-1]
            hid = None
            if keep_hidden:
                hid = np.stack([np.concatenate(per_layer_x[l])[:T] for l in range(L)])
                hidden = hid.shape[-1]
            sequences.append(SequenceTrace(tokens[:T], min(len(ids), T), experts, hid))
    finally:
        model.update_modules(tree_unflatten([(name, w.inner) for name, w in wrapped]))
        sink.clear()
    if progress is not None:
        progress(total, total)
    return RoutingTrace(
        sequences,
        num_layers=L,
        num_experts=int(fingerprint["num_experts"]),
        top_k=int(top_k),
        hidden_size=int(hidden or fingerprint["hidden_size"] or 0),
        fingerprint=fingerprint,
        meta={"max_tokens": max_tokens, "max_prompt_tokens": max_prompt_tokens, "prompts": len(encoded)},
    )
