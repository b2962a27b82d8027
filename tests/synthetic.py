"""Random-weight MoE checkpoints that `mlx_lm.load` loads unchanged.

`write_synthetic_moe` writes config.json, safetensors shards with an index and a
tokenizer for any mlx-lm MoE architecture built on `switch_layers`, in the
mlx-community layout (experts stacked per layer) or the Hugging Face layout (one
tensor per expert, stacked by the model's `sanitize()` on load).

Real-size geometries (e.g. Qwen3-30B-A3B, ~16 GB of 4-bit experts) are written
without ever holding the experts in memory: tensor names, shapes and dtypes come
from a lazily built mlx_lm model, the expert tensors are never evaluated, and
their bytes are generated with numpy one expert at a time, straight into the
shard file after its header.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import _get_classes

TOKENIZER_DIR = Path(__file__).parent / "models" / "demo-moe-4bit"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_VOCAB = 8192

# Architecture-neutral sizes; `_CONFIG_BUILDERS` maps them onto each model's
# config keys. For architectures whose experts are sized by `intermediate_size`
# (mixtral, olmoe, phimoe, granitemoe, gpt_oss) the expert width is
# `moe_intermediate_size`.
GEOMETRIES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=256,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_experts=8,
        top_k=2,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        vocab_size=TOKENIZER_VOCAB,
    ),
    # Same shape as the bundled chronos_mlx/models/demo-moe-4bit.
    "demo": dict(
        hidden_size=384,
        num_layers=8,
        num_heads=6,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=1024,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=512,
        num_experts=64,
        top_k=8,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        vocab_size=TOKENIZER_VOCAB,
    ),
    # Qwen/Qwen3-30B-A3B, except the vocabulary (the bundled 8192-token tokenizer).
    "qwen3-30b-a3b": dict(
        hidden_size=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=6144,
        moe_intermediate_size=768,
        shared_expert_intermediate_size=6144,
        num_experts=128,
        top_k=8,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        vocab_size=TOKENIZER_VOCAB,
    ),
}

MODEL_TYPES = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "deepseek_v2",
    "olmoe",
    "phimoe",
    "granitemoe",
    "gpt_oss",
    "llama",  # dense, no experts: for negative tests
)

# Safetensors dtype names and item sizes.
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ITEMSIZE = {"U32": 4, "F32": 4, "BF16": 2, "F16": 2}
_SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


# --------------------------------------------------------------------------
# configs


def _cfg_qwen3_moe(g):
    return dict(
        architectures=["Qwen3MoeForCausalLM"],
        hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_layers"],
        intermediate_size=g["intermediate_size"],
        num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_kv_heads"],
        head_dim=g["head_dim"],
        num_experts=g["num_experts"],
        num_experts_per_tok=g["top_k"],
        moe_intermediate_size=g["moe_intermediate_size"],
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        rope_theta=g["rope_theta"],
        max_position_embeddings=g["max_position_embeddings"],
        tie_word_embeddings=False,
        attention_bias=False,
        hidden_act="silu",
    )


def _cfg_qwen2_moe(g):
    # Head dim is hidden_size // num_heads in this architecture.
    return dict(
        architectures=["Qwen2MoeForCausalLM"],
        hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_layers"],
        intermediate_size=g["intermediate_size"],
        num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_kv_heads"],
        num_experts=g["num_experts"],
        num_experts_per_tok=g["top_k"],
        moe_intermediate_size=g["moe_intermediate_size"],
        shared_expert_intermediate_size=g["shared_expert_intermediate_size"],
        decoder_sparse_step=1,
        norm_topk_prob=False,
        rms_norm_eps=1e-6,
        rope_theta=g["rope_theta"],
        max_position_embeddings=g["max_position_embeddings"],
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def _cfg_mixtral(g):
    return dict(
        architectures=["MixtralForCausalLM"],
        hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_layers"],
        intermediate_size=g["moe_intermediate_size"],
        num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_kv_heads"],
        num_local_experts=g["num_experts"],
        num_experts_per_tok=g["top_k"],
        rms_norm_eps=1e-5,
        rope_theta=g["rope_theta"],
        max_position_embeddings=g["max_position_embeddings"],
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def _cfg_phimoe(g):
    return dict(
        architectures=["PhiMoEForCausalLM"],
        hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_layers"],
        intermediate_size=g["moe_intermediate_size"],
        num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_kv_heads"],
        num_local_experts=g["num_experts"],
        num_experts_per_tok=g["top_k"],
        rms_norm_eps=1e-5,
        rope_theta=g["rope_theta"],
        rope_scaling=None,  # plain RoPE
        max_position_embeddings=g["max_position_embeddings"],
        original_max_position_embeddings=g["max_position_embeddings"],
        router_jitter_noise=0.01,
        tie_word_embeddings=False,
    )


def _cfg_olmoe(g):
    return dict(
        architectures=["OlmoeForCausalLM"],
        hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_layers"],
        intermediate_size=g["moe_intermediate_size"],
        num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_kv_heads"],
        head_dim=g["head_dim"],
        num_experts=g["num_experts"],
        num_experts_per_tok=g["top_k"],
        norm_topk_prob=False,
        rms_norm_eps=1e-5,
        rope_theta=g["rope_theta"],
        max_position_embeddings=g["max_position_embeddings"],
        attention_bias=False,
        tie_word_embeddings=False,
    )


def _cfg_granitemoe(g):
    # Multipliers of ibm-granite/granite-3.0-1b-a400m.
    return dict(
        architectures=["GraniteMoeForCausalLM"],
        hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_layers"],
        intermediate_size=g["moe_intermediate_size"],
        num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_kv_heads"],
        num_local_experts=g["num_experts"],
        num_experts_per_tok=g["top_k"],
        rms_norm_eps=1e-6,
        rope_theta=g["rope_theta"],
        max_position_embeddings=g["max_position_embeddings"],
        attention_bias=False,
        logits_scaling=6.0,
        attention_multiplier=0.015625,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        tie_word_embeddings=True,
    )


def _cfg_deepseek_v2(g):
    # MLA sizes follow DeepSeek-V2-Lite's proportions to head_dim.
    hd = g["head_dim"]
    return dict(
        architectures=["DeepseekV2ForCausalLM"],
        hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_layers"],
        intermediate_size=g["intermediate_size"],
        moe_intermediate_size=g["moe_intermediate_size"],
        num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_heads"],
        n_routed_experts=g["num_experts"],
        n_shared_experts=1,
        num_experts_per_tok=g["top_k"],
        routed_scaling_factor=1.0,
        topk_method="greedy",
        moe_layer_freq=1,
        first_k_dense_replace=0,
        kv_lora_rank=4 * hd,
        q_lora_rank=None,
        qk_rope_head_dim=hd // 2,
        qk_nope_head_dim=hd,
        v_head_dim=hd,
        rms_norm_eps=1e-6,
        rope_theta=g["rope_theta"],
        rope_scaling={
            "type": "yarn",
            "factor": 1.0,
            "original_max_position_embeddings": g["max_position_embeddings"],
        },
        max_position_embeddings=g["max_position_embeddings"],
        attention_bias=False,
        tie_word_embeddings=False,
    )


def _gpt_oss_layer_types(n):
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


def _cfg_gpt_oss(g):
    return dict(
        architectures=["GptOssForCausalLM"],
        hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_layers"],
        intermediate_size=g["moe_intermediate_size"],
        num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_kv_heads"],
        head_dim=g["head_dim"],
        num_local_experts=g["num_experts"],
        num_experts_per_tok=g["top_k"],
        rms_norm_eps=1e-5,
        rope_theta=g["rope_theta"],
        rope_scaling=None,
        sliding_window=128,
        max_position_embeddings=g["max_position_embeddings"],
        layer_types=_gpt_oss_layer_types(g["num_layers"]),
        tie_word_embeddings=False,
    )


def _cfg_llama(g):
    return dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_layers"],
        intermediate_size=g["intermediate_size"],
        num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_kv_heads"],
        head_dim=g["head_dim"],
        rms_norm_eps=1e-5,
        rope_theta=g["rope_theta"],
        max_position_embeddings=g["max_position_embeddings"],
        tie_word_embeddings=False,
        hidden_act="silu",
    )


_CONFIG_BUILDERS: dict[str, Callable[[dict], dict]] = {
    "qwen3_moe": _cfg_qwen3_moe,
    "qwen2_moe": _cfg_qwen2_moe,
    "mixtral": _cfg_mixtral,
    "phimoe": _cfg_phimoe,
    "olmoe": _cfg_olmoe,
    "granitemoe": _cfg_granitemoe,
    "deepseek_v2": _cfg_deepseek_v2,
    "gpt_oss": _cfg_gpt_oss,
    "llama": _cfg_llama,
}


@dataclass(frozen=True)
class PerExpertNaming:
    """How a Hugging Face checkpoint names one expert's projections.

    `proj` maps the stacked SwitchGLU projection to the per-expert name;
    `stacks_quantized` says whether the model's sanitize() also stacks
    `.scales`/`.biases` (otherwise per-expert experts must be unquantized).
    """

    proj: dict
    stacks_quantized: bool


_HF = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_HF_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

PER_EXPERT: dict[str, PerExpertNaming] = {
    "qwen3_moe": PerExpertNaming(_HF, stacks_quantized=False),
    "qwen2_moe": PerExpertNaming(_HF, stacks_quantized=True),
    "olmoe": PerExpertNaming(_HF, stacks_quantized=True),
    "deepseek_v2": PerExpertNaming(_HF, stacks_quantized=True),
    "mixtral": PerExpertNaming(_HF_W, stacks_quantized=True),
    "phimoe": PerExpertNaming(_HF_W, stacks_quantized=True),
}


def build_config(
    model_type: str = "qwen3_moe",
    geometry="tiny",
    num_layers: Optional[int] = None,
    overrides: Optional[dict] = None,
) -> dict:
    """The unquantized config.json content (no `quantization` keys)."""
    if model_type not in _CONFIG_BUILDERS:
        raise ValueError(
            f"unsupported model_type {model_type!r}; choose one of {MODEL_TYPES}"
        )
    if isinstance(geometry, str):
        if geometry not in GEOMETRIES:
            raise ValueError(
                f"unknown geometry {geometry!r}; choose one of {list(GEOMETRIES)}"
            )
        g = dict(GEOMETRIES[geometry])
    else:
        g = {**GEOMETRIES["tiny"], **geometry}
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        g["num_layers"] = num_layers
    config = {"model_type": model_type, **_CONFIG_BUILDERS[model_type](g)}
    config.update(vocab_size=g["vocab_size"], bos_token_id=0, eos_token_id=0)
    config.update(overrides or {})
    if model_type == "gpt_oss":
        if "layer_types" not in (overrides or {}):
            config["layer_types"] = _gpt_oss_layer_types(config["num_hidden_layers"])
        # The model indexes both a sliding and a full attention layer.
        if len(set(config["layer_types"])) < 2:
            raise ValueError("gpt_oss needs at least 2 layers (sliding + full)")
    return config


# --------------------------------------------------------------------------
# tensors


@dataclass
class _Tensor:
    """One tensor to write; `chunks()` yields its bytes in order as numpy arrays."""

    name: str
    dtype: str  # safetensors dtype
    shape: tuple
    chunks: Callable[[], Iterator[np.ndarray]]
    expert: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    # NaN stays NaN: keep the high half without rounding.
    out = np.where(np.isnan(x), u >> np.uint32(16), rounded >> np.uint32(16))
    return out.astype(np.uint16)


def _cast(x: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "U32":
        return np.ascontiguousarray(x, dtype=np.uint32)
    if st_dtype == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if st_dtype == "F16":
        return np.ascontiguousarray(x, dtype=np.float16)
    if st_dtype == "BF16":
        return _to_bf16_bits(x)
    raise ValueError(st_dtype)


def _rng(seed: int, key: str, expert: int) -> np.random.Generator:
    # Keyed by module path, not tensor name, so both layouts get equal values.
    return np.random.default_rng([seed, zlib.crc32(key.encode()), expert])


def _expert_chunk(
    module_path: str, param: str, e: int, shape: tuple, module, seed: int, st_dtype: str
) -> np.ndarray:
    """Values of one expert's slice of one SwitchLinear parameter."""
    if param == "bias":
        return _cast(np.zeros(shape, np.float32), st_dtype)
    if isinstance(module, QuantizedSwitchLinear):
        levels = 2**module.bits - 1
        if param == "weight":
            # Uniform random words give uniform random codes at any bit width.
            rng = _rng(seed, f"{module_path}.weight", e)
            return rng.integers(0, 2**32, size=shape, dtype=np.uint32)
        # Dequantized w = scale * q + bias spans about +-1/sqrt(in_dims).
        in_dims = shape[-1] * module.group_size
        rng = _rng(seed, f"{module_path}.scales", e)
        scales = (2.0 / math.sqrt(in_dims) / levels) * rng.uniform(0.75, 1.25, shape)
        if param == "scales":
            return _cast(scales.astype(np.float32), st_dtype)
        if param == "biases":
            return _cast((-0.5 * levels * scales).astype(np.float32), st_dtype)
    elif param == "weight":
        bound = 1.0 / math.sqrt(shape[-1])
        rng = _rng(seed, f"{module_path}.weight", e)
        w = rng.uniform(-bound, bound, shape).astype(np.float32)
        return _cast(w, st_dtype)
    raise ValueError(f"unexpected expert parameter {module_path}.{param}")


def _expert_tensors(
    module_path, module, params: dict, layout, naming, model_type, seed, dtype
) -> list:
    """Tensors of one SwitchLinear module (stacked, or one per expert)."""
    out = []
    num_experts = next(iter(params.values())).shape[0]
    for param, arr in params.items():
        st = "U32" if arr.dtype == mx.uint32 else _ST_DTYPE[dtype]
        one = tuple(arr.shape[1:])

        def gen(e, param=param, one=one, st=st):
            return _expert_chunk(module_path, param, e, one, module, seed, st)

        if layout == "stacked":
            out.append(
                _Tensor(
                    f"{module_path}.{param}",
                    st,
                    tuple(arr.shape),
                    lambda gen=gen: (gen(e) for e in range(num_experts)),
                    expert=True,
                )
            )
            continue
        if param == "bias":
            raise ValueError(
                f"{model_type}: per-expert layout cannot carry expert biases"
            )
        parent, proj = module_path.rsplit(".switch_mlp.", 1)
        for e in range(num_experts):
            out.append(
                _Tensor(
                    f"{parent}.experts.{e}.{naming.proj[proj]}.{param}",
                    st,
                    one,
                    lambda gen=gen, e=e: iter((gen(e),)),
                    expert=True,
                )
            )
    if layout == "per-expert":
        # Expert-major order: each expert's tensors sit together in the file.
        out.sort(key=lambda t: int(t.name.split(".experts.", 1)[1].split(".")[0]))
    return out


def _dense_tensor(name: str, arr: mx.array, pending: dict, dtype: str) -> _Tensor:
    st = "U32" if arr.dtype == mx.uint32 else _ST_DTYPE[dtype]
    if arr.dtype not in (mx.uint32, mx.float32, mx.float16, mx.bfloat16):
        raise ValueError(f"unexpected parameter dtype {arr.dtype} for {name}")

    def chunks():
        # Pop so the evaluated array is freed once written.
        a = pending.pop(name)
        if a.dtype != mx.uint32:
            a = a.astype(mx.float32)
        mx.eval(a)
        yield _cast(np.array(a), st)

    return _Tensor(name, st, tuple(arr.shape), chunks)


_PLAIN = (
    nn.Linear,
    nn.QuantizedLinear,
    nn.Embedding,
    nn.QuantizedEmbedding,
    SwitchLinear,
    QuantizedSwitchLinear,
)


def _randomize_bare_matrices(model: nn.Module):
    # Routers that are plain parameters (e.g. deepseek's MoEGate.weight) start
    # at zero, which would route every token uniformly; give them Linear's init.
    for _, m in model.named_modules():
        if isinstance(m, _PLAIN):
            continue
        w = m.get("weight") if isinstance(m, dict) else None
        if isinstance(w, mx.array) and w.ndim == 2:
            bound = 1.0 / math.sqrt(w.shape[-1])
            m["weight"] = mx.random.uniform(-bound, bound, w.shape)


def _is_expert(m) -> bool:
    return isinstance(m, (SwitchLinear, QuantizedSwitchLinear))


def _build_model(config, bits, group_size, quantize_experts, seed):
    """Lazy mlx_lm model, quantized like mlx_lm.convert would; nothing evaluated."""
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    _randomize_bare_matrices(model)
    per_path = {}
    if bits is not None:
        model_pred = getattr(model, "quant_predicate", None)

        # Mirrors mlx_lm.utils.quantize_model (which prints, so not called).
        def predicate(path, m):
            if not hasattr(m, "to_quantized"):
                return False
            if m.weight.shape[-1] % group_size != 0:
                return False
            if _is_expert(m) and not quantize_experts:
                return False
            res = model_pred(path, m) if model_pred is not None else True
            if isinstance(res, dict):
                per_path[path] = res
            return res

        nn.quantize(model, group_size, bits, mode="affine", class_predicate=predicate)
    return model, per_path


def _collect_tensors(model, layout, naming, model_type, seed, dtype):
    experts = {p: m for p, m in model.named_modules() if _is_expert(m)}
    if layout == "per-expert" and not experts:
        raise ValueError(f"{model_type} has no experts to lay out per expert")
    flat = tree_flatten(model.parameters())
    pending = {}
    grouped: dict[str, dict] = {}
    order = []  # names of dense tensors and expert module paths, in model order
    for name, arr in flat:
        owner, param = name.rsplit(".", 1)
        if owner in experts:
            if owner not in grouped:
                grouped[owner] = {}
                order.append(("expert", owner))
            grouped[owner][param] = arr
        else:
            pending[name] = arr
            order.append(("dense", name))
    tensors = []
    for kind, key in order:
        if kind == "dense":
            tensors.append(_dense_tensor(key, pending[key], pending, dtype))
        else:
            tensors += _expert_tensors(
                key, experts[key], grouped[key], layout, naming, model_type, seed, dtype
            )
    return tensors


# --------------------------------------------------------------------------
# safetensors


def _write_safetensors(path: Path, tensors: list):
    """Header first (from names/shapes/dtypes), then each tensor's chunks."""
    # Widest items first, so every tensor's offset is aligned to its item size.
    tensors = sorted(tensors, key=lambda t: -_ITEMSIZE[t.dtype])
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for t in tensors:
            written = 0
            for chunk in t.chunks():
                if chunk.dtype.itemsize != _ITEMSIZE[t.dtype]:
                    raise RuntimeError(f"{t.name}: chunk dtype {chunk.dtype}")
                f.write(np.ascontiguousarray(chunk).data)
                written += chunk.nbytes
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {written} of {t.nbytes} bytes")


def _split_shards(tensors: list, max_shard_bytes: int) -> list:
    # Tensor granularity: a stacked expert tensor is never split across shards.
    shards, size = [], 0
    for t in tensors:
        if not shards or (shards[-1] and size + t.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _atomic_write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=4)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# public entry point


def write_synthetic_moe(
    out_dir,
    model_type: str = "qwen3_moe",
    *,
    layout: str = "stacked",
    bits: Optional[int] = 4,
    group_size: int = 64,
    dtype: str = "float32",
    geometry="tiny",
    num_layers: Optional[int] = None,
    overrides: Optional[dict] = None,
    seed: int = 0,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write a random-weight checkpoint that `mlx_lm.load(out_dir)` loads.

    model_type: an mlx-lm MoE architecture (see MODEL_TYPES), or "llama" (dense).
    layout: "stacked" (mlx-community: `...switch_mlp.gate_proj.weight` of shape
        [num_experts, ...]) or "per-expert" (Hugging Face: `...experts.E.gate_proj.weight`,
        stacked by the model's sanitize() on load; see PER_EXPERT).
    bits: 2..8 for mlx affine quantization of every layer whose input dims divide
        by group_size (routers as the model's quant_predicate says, e.g. 8-bit);
        None for unquantized `dtype` tensors. With layout="per-expert" on an
        architecture whose sanitize() does not stack scales (qwen3_moe), experts
        are written unquantized and everything else follows `bits`.
    dtype: "float32", "bfloat16" or "float16" for float tensors and scales/biases.
    geometry: a GEOMETRIES name, or a dict of its keys over "tiny".
    num_layers, overrides: reduce the layer count; update config.json keys.
    seed: same seed, same bytes. Expert values do not depend on the layout.

    Existing config.json, model*.safetensors and the index in out_dir are replaced;
    config.json is written last, so its presence means the checkpoint is complete.
    """
    if layout not in ("stacked", "per-expert"):
        raise ValueError(f"layout must be 'stacked' or 'per-expert', not {layout!r}")
    if bits == 0:
        bits = None
    if bits is not None and bits not in _SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {_SUPPORTED_BITS} or None, not {bits}")
    if dtype not in _ST_DTYPE:
        raise ValueError(f"dtype must be one of {list(_ST_DTYPE)}, not {dtype!r}")
    if group_size <= 0 or max_shard_bytes <= 0:
        raise ValueError("group_size and max_shard_bytes must be positive")

    config = build_config(model_type, geometry, num_layers, overrides)
    naming = None
    quantize_experts = bits is not None
    if layout == "per-expert":
        naming = PER_EXPERT.get(model_type)
        if naming is None:
            raise ValueError(
                f"{model_type}: sanitize() does not stack per-expert tensors; "
                f"per-expert layout supports {sorted(PER_EXPERT)}"
            )
        quantize_experts = quantize_experts and naming.stacks_quantized

    model, per_path = _build_model(config, bits, group_size, quantize_experts, seed)
    tensors = _collect_tensors(model, layout, naming, model_type, seed, dtype)
    del model  # the tensors keep only what they still have to write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Invalidate first: a half-written directory must not look loadable.
    for stale in ["config.json", "model.safetensors.index.json"] + [
        p.name for p in out.glob("model*.safetensors")
    ]:
        (out / stale).unlink(missing_ok=True)

    shards = _split_shards(tensors, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / fname, shard)
        weight_map.update((t.name, fname) for t in shard)

    index = {
        "metadata": {
            "total_size": sum(t.nbytes for t in tensors),
            "expert_size": sum(t.nbytes for t in tensors if t.expert),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    _atomic_write_json(out / "model.safetensors.index.json", index)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, out / name)

    if bits is not None:
        q = {"group_size": group_size, "bits": bits, "mode": "affine", **per_path}
        config["quantization"] = q
        config["quantization_config"] = dict(q)
    config["torch_dtype"] = dtype
    _atomic_write_json(out / "config.json", dict(sorted(config.items())))
    return out
