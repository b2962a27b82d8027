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

import dataclasses
import importlib
import json
import math
import os
import pkgutil
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models
import numpy as np
from mlx.utils import tree_flatten

from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import MODEL_REMAPPING, _get_classes

from chronos_mlx import DEFAULT_MODEL

# The bundled demo model's tokenizer (8192 tokens).
TOKENIZER_DIR = Path(DEFAULT_MODEL)
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
        sliding_window=8,
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
        sliding_window=128,
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
        sliding_window=4096,
        vocab_size=TOKENIZER_VOCAB,
    ),
}

# Safetensors dtype names and item sizes.
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ITEMSIZE = {"U32": 4, "F32": 4, "BF16": 2, "F16": 2}
_SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


# --------------------------------------------------------------------------
# configs


def _base(g, *names):
    """The config keys every hand-written builder below shares, plus `names` taken from the
    geometry under mlx-lm's usual spelling (`_sizes`: "head_dim", "num_local_experts", ...)."""
    sizes = _sizes(g)
    return dict(
        hidden_size=g["hidden_size"],
        num_hidden_layers=g["num_layers"],
        num_attention_heads=g["num_heads"],
        rope_theta=g["rope_theta"],
        max_position_embeddings=g["max_position_embeddings"],
        **{n: sizes[n] for n in names},
    )


def _cfg_qwen3_moe(g):
    return dict(
        **_base(g, "num_experts_per_tok", "intermediate_size", "num_key_value_heads", "head_dim", "num_experts",
                "moe_intermediate_size"),
        architectures=["Qwen3MoeForCausalLM"],
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        hidden_act="silu",
    )


def _cfg_qwen2_moe(g):
    # Head dim is hidden_size // num_heads in this architecture.
    return dict(
        **_base(g, "num_experts_per_tok", "intermediate_size", "num_key_value_heads", "num_experts",
                "moe_intermediate_size", "shared_expert_intermediate_size"),
        architectures=["Qwen2MoeForCausalLM"],
        decoder_sparse_step=1,
        norm_topk_prob=False,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def _cfg_mixtral(g):
    return dict(
        **_base(g, "num_experts_per_tok", "num_key_value_heads", "num_local_experts"),
        architectures=["MixtralForCausalLM"],
        intermediate_size=g["moe_intermediate_size"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def _cfg_phimoe(g):
    return dict(
        **_base(g, "num_experts_per_tok", "num_key_value_heads", "num_local_experts"),
        architectures=["PhiMoEForCausalLM"],
        intermediate_size=g["moe_intermediate_size"],
        rms_norm_eps=1e-5,
        rope_scaling=None,  # plain RoPE
        original_max_position_embeddings=g["max_position_embeddings"],
        router_jitter_noise=0.01,
        tie_word_embeddings=False,
    )


def _cfg_olmoe(g):
    return dict(
        **_base(g, "num_experts_per_tok", "num_key_value_heads", "head_dim", "num_experts"),
        architectures=["OlmoeForCausalLM"],
        intermediate_size=g["moe_intermediate_size"],
        norm_topk_prob=False,
        rms_norm_eps=1e-5,
        attention_bias=False,
        tie_word_embeddings=False,
    )


def _cfg_granitemoe(g):
    # Multipliers of ibm-granite/granite-3.0-1b-a400m.
    return dict(
        **_base(g, "num_experts_per_tok", "num_key_value_heads", "num_local_experts"),
        architectures=["GraniteMoeForCausalLM"],
        intermediate_size=g["moe_intermediate_size"],
        rms_norm_eps=1e-6,
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
        **_base(g, "num_experts_per_tok", "intermediate_size", "moe_intermediate_size", "n_routed_experts"),
        architectures=["DeepseekV2ForCausalLM"],
        num_key_value_heads=g["num_heads"],
        n_shared_experts=1,
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
        rope_scaling={
            "type": "yarn",
            "factor": 1.0,
            "original_max_position_embeddings": g["max_position_embeddings"],
        },
        attention_bias=False,
        tie_word_embeddings=False,
    )


def _gpt_oss_layer_types(n):
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


def _cfg_gpt_oss(g):
    return dict(
        **_base(g, "num_experts_per_tok", "num_key_value_heads", "head_dim", "num_local_experts"),
        architectures=["GptOssForCausalLM"],
        intermediate_size=g["moe_intermediate_size"],
        rms_norm_eps=1e-5,
        rope_scaling=None,
        sliding_window=g["sliding_window"],
        layer_types=_gpt_oss_layer_types(g["num_layers"]),
        tie_word_embeddings=False,
    )


def _cfg_llama(g):
    return dict(
        **_base(g, "intermediate_size", "num_key_value_heads", "head_dim"),
        architectures=["LlamaForCausalLM"],
        rms_norm_eps=1e-5,
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

# --------------------------------------------------------------------------
# every MoE architecture of the installed mlx-lm

_MODELS_DIR = Path(mlx_lm.models.__file__).parent


def _sibling_imports(src: str) -> set:
    """Names of the mlx_lm.models modules that `src` imports."""
    out = set()
    for mod, names in re.findall(r"^from \.(\w*) import ([^\n]+)", src, re.M):
        out |= {mod} if mod else {n.strip() for n in names.split(",")}
    return out


def moe_model_types() -> list:
    """Every model type of the installed mlx-lm whose model has routed experts.

    A model file is MoE if it uses `switch_layers`, or imports a model file that
    does (multimodal wrappers, e.g. qwen3_vl_moe over qwen3_moe); dbrx keeps its
    experts as a list of per-expert MLPs. Model types that `MODEL_REMAPPING`
    maps onto one of them are included, so a new architecture shows up here
    (and fails the tests) until `ARCHS` knows it.
    """
    srcs = {
        m.name: (_MODELS_DIR / f"{m.name}.py").read_text()
        for m in pkgutil.iter_modules([str(_MODELS_DIR)])
        if not m.ispkg
    }
    moe = {n for n, s in srcs.items() if "switch_layers" in s} - {"switch_layers"}
    moe.add("dbrx")
    deps = {n: _sibling_imports(s) for n, s in srcs.items()}
    while True:
        more = {n for n in srcs if n not in moe and deps[n] & moe}
        if not more:
            break
        moe |= more
    aliases = {k for k, v in MODEL_REMAPPING.items() if v in moe}
    return sorted(moe | aliases)


def _sizes(g) -> dict:
    """Geometry values under every name mlx-lm's ModelArgs use for them."""
    H, L = g["hidden_size"], g["num_layers"]
    return dict(
        hidden_size=H, d_model=H, model_dim=H,
        num_hidden_layers=L, num_layers=L, n_layers=L,
        num_attention_heads=g["num_heads"], n_heads=g["num_heads"],
        num_heads=g["num_heads"], swa_num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_kv_heads"], swa_num_key_value_heads=g["num_kv_heads"],
        num_global_key_value_heads=g["num_kv_heads"], num_attention_groups=g["num_kv_heads"],
        head_dim=g["head_dim"], swa_head_dim=g["head_dim"], global_head_dim=g["head_dim"],
        intermediate_size=g["intermediate_size"], ffn_hidden_size=g["intermediate_size"],
        dense_intermediate_size=g["intermediate_size"],
        intermediate_size_mlp=g["intermediate_size"],
        moe_intermediate_size=g["moe_intermediate_size"],
        expert_ffn_hidden_size=g["moe_intermediate_size"],
        moe_hidden_size=g["moe_intermediate_size"],
        shared_expert_intermediate_size=g["shared_expert_intermediate_size"],
        shared_intermediate_size=g["shared_expert_intermediate_size"],
        num_experts=g["num_experts"], n_routed_experts=g["num_experts"],
        num_local_experts=g["num_experts"], moe_num_experts=g["num_experts"],
        num_experts_per_tok=g["top_k"], num_experts_per_token=g["top_k"],
        moe_topk=g["top_k"], moe_top_k=g["top_k"], moe_k=g["top_k"],
        top_k_experts=g["top_k"],
        vocab_size=g["vocab_size"], num_vocab=g["vocab_size"],
        vocab_size_per_layer_input=g["vocab_size"],
        rope_theta=g["rope_theta"], swa_rope_theta=g["rope_theta"],
        max_position_embeddings=g["max_position_embeddings"],
        model_max_length=g["max_position_embeddings"],
        original_max_position_embeddings=g["max_position_embeddings"],
        # Windows and chunks shorter than the tests' prompt + generation: rotating
        # caches wrap.
        sliding_window=g["sliding_window"], sliding_window_size=g["sliding_window"],
        attention_chunk_size=g["sliding_window"],
        # MLA, at DeepSeek-V2-Lite's proportions to head_dim.
        kv_lora_rank=4 * g["head_dim"], q_lora_rank=None,
        qk_rope_head_dim=g["head_dim"] // 2, qk_nope_head_dim=g["head_dim"],
        v_head_dim=g["head_dim"], swa_v_head_dim=g["head_dim"],
        # One routing group, so group-limited routing is valid with 8 experts.
        n_group=1, topk_group=1, num_expert_group=1,
        # One shared expert wherever the architecture can have them.
        n_shared_experts=1, num_shared_experts=1, num_shared_expert=1, moe_num_shared_experts=1,
    )


# Values for fields that have no default, by name, when the geometry has none.
_REQUIRED = dict(
    rms_norm_eps=1e-6, norm_eps=1e-6, layer_norm_epsilon=1e-6, layernorm_epsilon=1e-6,
    post_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, use_bias=False,
    mlp_bias=False, use_qkv_bias=False, use_qk_norm=False, norm_topk_prob=True,
    routed_scaling_factor=1.0, first_k_dense_replace=0, decoder_sparse_step=1,
    mlp_only_layers=[], moe_layer_freq=1, rope_scaling=None, partial_rotary_factor=0.5,
    topk_method="noaux_tc", scoring_func="sigmoid",
)


def _alternate(n, first="sliding_attention", second="full_attention"):
    return [first if i % 2 == 0 else second for i in range(n)]


@dataclass(frozen=True)
class Arch:
    """How to fill one architecture's config from a geometry.

    args: the dataclass whose fields are filled (the module's ModelArgs, or a
        multimodal wrapper's text arguments, which go under `text_config`).
    inner_type: `text_config.model_type` of a wrapper.
    layers: the fewest layers that keep every layer kind (and one MoE layer).
    config: per-architecture keys over the generic fill, a function of the geometry
        (with `num_layers` already raised to `layers`).
    top: keys of a wrapper's top-level config.
    tokenizer: keys added to tokenizer_config.json.
    """

    args: str = "ModelArgs"
    inner_type: Optional[str] = None
    layers: int = 3
    config: Callable[[dict], dict] = lambda g: {}
    top: Callable[[dict], dict] = lambda g: {}
    tokenizer: dict = dataclasses.field(default_factory=dict)


ARCHS: dict = {}

# Architectures the writer cannot build, each with the reason.
EXCLUDED: dict = {}


def _linear_attn(g):
    # Gated-delta / KDA linear attention: a few small heads.
    return dict(
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_conv_kernel_dim=4, full_attention_interval=2,
    )


def _kda(g, every=2):
    # Kimi delta attention on the odd layers (1-based), full MLA attention on the rest.
    n = g["num_layers"]
    return dict(
        num_heads=2, head_dim=32, short_conv_kernel_size=4,
        kda_layers=[i + 1 for i in range(n) if i % every == 0],
        full_attn_layers=[i + 1 for i in range(n) if i % every != 0],
    )


def _qwen35_text(g):
    return dict(
        num_experts=g["num_experts"], mlp_only_layers=[], **_linear_attn(g),
        rope_parameters={"rope_theta": g["rope_theta"], "partial_rotary_factor": 0.25,
                         "rope_type": "default"},
    )


ARCHS.update({
    "Klear": Arch(),
    "afmoe": Arch(config=lambda g: dict(layer_types=_alternate(g["num_layers"]), num_dense_layers=1)),
    "bailing_hybrid": Arch(layers=4, config=lambda g: dict(layer_group_size=2, group_norm_size=2, first_k_dense_replace=1)),
    "bailing_moe": Arch(config=lambda g: dict(first_k_dense_replace=1)),
    "bailing_moe_linear": Arch(
        layers=4,
        config=lambda g: dict(layer_group_size=2, group_norm_size=2, first_k_dense_replace=1,
                              num_key_value_heads=g["num_heads"]),
    ),
    "bailing_moe_v3": Arch(layers=4, config=lambda g: dict(layer_group_size=2, first_k_dense_replace=1)),
    "dbrx": Arch(
        config=lambda g: dict(
            ffn_config=dict(ffn_hidden_size=g["moe_intermediate_size"], moe_num_experts=g["num_experts"],
                            moe_top_k=g["top_k"]),
            attn_config=dict(kv_n_heads=g["num_kv_heads"], clip_qkv=8.0, rope_theta=g["rope_theta"]),
        )
    ),
    "deepseek": Arch(config=lambda g: dict(first_k_dense_replace=1)),
    "deepseek_v3": Arch(config=lambda g: dict(first_k_dense_replace=1, q_lora_rank=2 * g["head_dim"])),
    "deepseek_v32": Arch(config=lambda g: dict(first_k_dense_replace=1, q_lora_rank=2 * g["head_dim"],
                                               index_head_dim=32, index_n_heads=2, index_topk=8)),
    "deepseek_v41": Arch(config=lambda g: dict(q_lora_rank=2 * g["head_dim"], index_head_dim=32,
                                               index_n_heads=2, index_topk=8, o_groups=2, o_lora_rank=64)),
    "dots1": Arch(config=lambda g: dict(first_k_dense_replace=1)),
    "ernie4_5_moe": Arch(config=lambda g: dict(moe_layer_start_index=1)),
    "exaone_moe": Arch(
        config=lambda g: dict(layer_types=_alternate(g["num_layers"]),
                              is_moe_layer=[i > 0 for i in range(g["num_layers"])])
    ),
    "gemma4": Arch(args="gemma4_text:ModelArgs", inner_type="gemma4_text",
                   config=lambda g: ARCHS["gemma4_text"].config(g)),
    "gemma4_text": Arch(
        layers=3,
        config=lambda g: dict(
            enable_moe_block=True, num_kv_shared_layers=0, hidden_size_per_layer_input=0,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],  # last is full
            final_logit_softcapping=30.0,
        ),
    ),
    "glm4_moe": Arch(config=lambda g: dict(first_k_dense_replace=1)),
    "glm4_moe_lite": Arch(config=lambda g: dict(first_k_dense_replace=1, q_lora_rank=2 * g["head_dim"])),
    "glm_moe_dsa": Arch(
        config=lambda g: dict(
            first_k_dense_replace=1, q_lora_rank=2 * g["head_dim"], index_head_dim=32, index_n_heads=2,
            index_topk=8, rope_parameters={"rope_theta": g["rope_theta"], "rope_type": "default"},
        )
    ),
    "granitemoehybrid": Arch(
        layers=3,
        config=lambda g: dict(
            layer_types=["mamba", "attention", "mamba"], embedding_multiplier=12.0,
            attention_multiplier=0.015625, logits_scaling=6.0, residual_multiplier=0.22,
            # transformers checks mamba_n_heads * mamba_d_head == 2 * hidden_size.
            mamba_n_heads=8, mamba_d_head=g["hidden_size"] // 4, mamba_proj_bias=False, mamba_d_state=16,
            mamba_d_conv=4, mamba_n_groups=1, mamba_conv_bias=True,
        ),
    ),
    "hunyuan": Arch(
        layers=3,
        config=lambda g: dict(use_mixed_mlp_moe=True, use_qk_norm=True, use_cla=True, cla_share_factor=2,
                              rope_scaling={"alpha": 1000.0, "factor": 1.0, "type": "dynamic"}),
    ),
    "jamba": Arch(
        layers=4,  # mamba + attention, each with and without experts
        config=lambda g: dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=0,
                              expert_layer_period=2, mamba_d_conv=4, mamba_d_state=16, mamba_expand=2),
    ),
    "kimi_k25": Arch(args="TextConfig", inner_type="deepseek_v3",
                     config=lambda g: ARCHS["deepseek_v3"].config(g)),
    "kimi_k3": Arch(args="TextArgs", inner_type="kimi_linear", layers=3,
                    config=lambda g: dict(linear_attn_config=_kda(g), num_experts=g["num_experts"],
                                          q_lora_rank=2 * g["head_dim"], first_k_dense_replace=1)),
    "kimi_linear": Arch(layers=3, config=lambda g: dict(linear_attn_config=_kda(g), first_k_dense_replace=1)),
    "kimi_vl": Arch(args="TextArgs", inner_type="deepseek_v3",
                    config=lambda g: ARCHS["deepseek_v3"].config(g)),
    "laguna": Arch(),
    "lfm2_moe": Arch(
        layers=3,
        config=lambda g: dict(use_expert_bias=True, num_dense_layers=1, conv_bias=False, conv_L_cache=3,
                              layer_types=["conv", "full_attention", "conv"]),
    ),
    "llama4": Arch(args="TextArgs", inner_type="llama4_text", layers=4,
                   # Llama 4's MoE routes each token to one expert only.
                   config=lambda g: dict(interleave_moe_layer_step=1, use_qk_norm=True, num_experts_per_tok=1,
                                         rope_scaling=None)),
    "longcat_flash": Arch(
        config=lambda g: dict(attention_method="MLA", zero_expert_type="identity", zero_expert_num=2,
                              mla_scale_q_lora=True, mla_scale_kv_lora=True,
                              q_lora_rank=2 * g["head_dim"]),
    ),
    # N-gram embeddings are ngram_vocab_size_ratio x vocab rows: keep them small.
    "longcat_flash_ngram": Arch(config=lambda g: dict(ARCHS["longcat_flash"].config(g), ngram_vocab_size_ratio=2)),
    "mellum": Arch(
        config=lambda g: dict(
            layer_types=_alternate(g["num_layers"]),
            rope_parameters={t: {"rope_theta": g["rope_theta"], "rope_type": "default"}
                             for t in ("sliding_attention", "full_attention")},
        )
    ),
    "mimo_v2_flash": Arch(
        config=lambda g: dict(
            hybrid_layer_pattern=[1 if i % 2 == 0 else 0 for i in range(g["num_layers"])],
            moe_layer_freq=[0] + [1] * (g["num_layers"] - 1),
            add_swa_attention_sink_bias=True, add_full_attention_sink_bias=False,
        ),
    ),
    "minimax": Arch(config=lambda g: dict(rotary_dim=g["head_dim"] // 2)),
    "minimax_m3_vl": Arch(args="TextArgs", inner_type="minimax_m3", config=lambda g: dict(rotary_dim=g["head_dim"] // 2)),
    "mistral3": Arch(args="mistral4:ModelArgs", inner_type="mistral4",
                     config=lambda g: ARCHS["mistral4"].config(g)),
    "mistral4": Arch(
        config=lambda g: dict(
            first_k_dense_replace=1, q_lora_rank=2 * g["head_dim"],
            rope_parameters={"rope_theta": g["rope_theta"], "llama_4_scaling_beta": 0.1,
                             "original_max_position_embeddings": g["max_position_embeddings"],
                             "rope_type": "default"},
        )
    ),
    "muse_spark": Arch(
        args="TextArgs", inner_type="muse_spark_text",
        config=lambda g: dict(
            rope_parameters={"rope_theta": g["rope_theta"]},
            layer_rope_theta=[g["rope_theta"], 0.0, g["rope_theta"]],
            layer_types=_alternate(g["num_layers"]),
            final_logit_softcapping=30.0, output_multiplier=1.0, moe_hidden_size=g["hidden_size"] // 2,
            num_shared_experts=0,
        ),
        # transformers' config check wants the audio tower (which mlx-lm never builds)
        # sized to the text model; no vision_config, so no vision tower.
        top=lambda g: dict(audio_config={"out_hidden_size": g["hidden_size"]}),
        # mlx_lm's muse_spark chat-template module only formats responses: the
        # tokenizer must bring its own template.
        tokenizer={"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
    ),
    "nemotron_h": Arch(
        layers=4,
        config=lambda g: dict(
            hybrid_override_pattern=["M", "E", "*", "E"], mamba_num_heads=4, mamba_head_dim=32,
            mamba_proj_bias=False, ssm_state_size=16, conv_kernel=4, n_groups=1, use_conv_bias=True,
            moe_shared_expert_intermediate_size=g["shared_expert_intermediate_size"],
            n_shared_experts=1, routed_scaling_factor=1.0, norm_topk_prob=True,
        ),
    ),
    "phixtral": Arch(),
    "qwen3_5": Arch(args="TextModelArgs", inner_type="qwen3_5_text", config=_qwen35_text),
    "qwen3_5_moe": Arch(args="qwen3_5:TextModelArgs", inner_type="qwen3_5_moe_text", config=_qwen35_text),
    "qwen3_next": Arch(config=lambda g: dict(_linear_attn(g), partial_rotary_factor=0.25)),
    "qwen3_vl_moe": Arch(args="qwen3_moe:ModelArgs", inner_type="qwen3_vl_moe_text",
                         config=lambda g: dict(rope_scaling=None)),
    "solar_open": Arch(config=lambda g: dict(first_k_dense_replace=1)),
    "step3p5": Arch(
        config=lambda g: dict(layer_types=_alternate(g["num_layers"]), moe_layers_enum=",".join(
            str(i) for i in range(1, g["num_layers"])), share_expert_dim=g["shared_expert_intermediate_size"]),
    ),
})

EXCLUDED.update({
    "prism_hadamard_qwen35": "a Hadamard-rotated 2-bit pack with its own tensor namespace and "
    "module list, not a checkpoint layout that mlx_lm.convert writes",
})


def _module_of(model_type):
    model_type = MODEL_REMAPPING.get(model_type, model_type)
    return importlib.import_module(f"mlx_lm.models.{model_type}")


def _fill(args_class, g, extra) -> dict:
    """The fields of `args_class` the geometry (or `_REQUIRED`) names, then `extra`."""
    sizes = _sizes(g)
    out = {}
    for f in dataclasses.fields(args_class):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in sizes:
            out[f.name] = sizes[f.name]
        elif required and f.name in _REQUIRED:
            out[f.name] = _REQUIRED[f.name]
    out.pop("model_type", None)
    out.update(extra)
    return out


def _cfg_generic(model_type, g) -> dict:
    arch = ARCHS[MODEL_REMAPPING.get(model_type, model_type)]
    g = {**g, "num_layers": max(g["num_layers"], arch.layers)}
    module, _, name = arch.args.rpartition(":")
    module = importlib.import_module(f"mlx_lm.models.{module}") if module else _module_of(model_type)
    args_class = getattr(module, name)
    cfg = _fill(args_class, g, arch.config(g))
    if arch.inner_type is None:
        return cfg
    text = {"model_type": arch.inner_type, **cfg}
    return {"text_config": text, "vocab_size": g["vocab_size"], **arch.top(g)}


def needs_metal(model_type) -> bool:
    """Whether the model runs mlx-lm's custom Metal kernels (so only on a Metal device)."""
    src = _module_of(model_type).__file__
    return "from ..kernels import" in Path(src).read_text()


def runnable(model_type) -> bool:
    return not needs_metal(model_type) or mx.metal.is_available()


def _writable(model_type) -> bool:
    return model_type in _CONFIG_BUILDERS or MODEL_REMAPPING.get(model_type) in ARCHS or model_type in ARCHS


# Every MoE architecture the writer knows, then "llama" (dense, for negative tests).
MOE_TYPES = tuple(t for t in moe_model_types() if _writable(t) and t != "llama")
MODEL_TYPES = MOE_TYPES + ("llama",)


def build_config(
    model_type: str = "qwen3_moe",
    geometry="tiny",
    num_layers: Optional[int] = None,
    overrides: Optional[dict] = None,
) -> dict:
    """The unquantized config.json content (no `quantization` keys)."""
    if model_type not in MODEL_TYPES:
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
    if model_type in _CONFIG_BUILDERS:
        config = {"model_type": model_type, **_CONFIG_BUILDERS[model_type](g)}
    else:
        config = {"model_type": model_type, **_cfg_generic(model_type, g)}
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
    arch = ARCHS.get(MODEL_REMAPPING.get(model_type, model_type))
    if arch is not None and arch.tokenizer:
        tc = json.loads((out / "tokenizer_config.json").read_text())
        _atomic_write_json(out / "tokenizer_config.json", {**tc, **arch.tokenizer})

    if bits is not None:
        q = {"group_size": group_size, "bits": bits, "mode": "affine", **per_path}
        config["quantization"] = q
        config["quantization_config"] = dict(q)
    config["torch_dtype"] = dtype
    _atomic_write_json(out / "config.json", dict(sorted(config.items())))
    return out


# A chat template that renders tools and earlier tool calls (arguments as objects, as
# mlx_lm.server passes them), for tokenizers that call tools with `<tool_call>{json}</tool_call>`.
CHAT_TEMPLATE = (
    "{%- if preamble %}{{ preamble }}\n{% endif %}"
    "{%- if tools %}Tools:\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>\n{% endif %}"
    "{%- for m in messages %}{{ m.role }}: {{ m.content }}"
    "{%- if m.tool_calls %}{%- for tool_call in m.tool_calls %}"
    "<tool_call>{\"name\": \"{{ tool_call.function.name }}\", \"arguments\": {\"city\": "
    "\"{{ tool_call.function.arguments['city'] }}\"}}"
    "</tool_call>{%- endfor %}{%- endif %}\n{% endfor %}"
    "{%- if add_generation_prompt %}assistant:{% endif %}"
)


def write_chat_model(path: Path, thinking: bool = True) -> Path:
    """The demo model (its weights linked, not copied) with a tokenizer that has a chat
    template, mlx_lm's `json_tools` tool parser and, with `thinking`, `<think>` / `</think>`
    tokens (added after the model's vocabulary: for the tokenizer's markers only, never fed
    to the model)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    demo = Path(DEFAULT_MODEL)
    for f in demo.iterdir():
        if f.name in ("tokenizer_config.json", "tokenizer.json"):
            continue
        target = path / f.name
        if not target.exists():
            target.symlink_to(f.resolve())
    config = json.loads((demo / "tokenizer_config.json").read_text())
    config.update(chat_template=CHAT_TEMPLATE, tool_parser_type="json_tools")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = json.loads((demo / "tokenizer.json").read_text())
    if thinking:
        top = max(max(tok["model"]["vocab"].values()), *(t["id"] for t in tok.get("added_tokens", [])))
        for i, marker in enumerate(("<think>", "</think>"), 1):
            tok.setdefault("added_tokens", []).append({"id": top + i, "content": marker, "single_word": False,
                                                       "lstrip": False, "rstrip": False, "normalized": False,
                                                       "special": False})
    (path / "tokenizer.json").write_text(json.dumps(tok))
    return path
