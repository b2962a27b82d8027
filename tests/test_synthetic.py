"""Synthetic MoE checkpoints: what `write_synthetic_moe` writes, and that mlx_lm loads it.

Every checkpoint here is tiny (or one layer of a real geometry with few experts)
and written once per module into a temporary directory.
"""

import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from safetensors import safe_open

from synthetic import (
    EXCLUDED,
    MODEL_TYPES,
    MOE_TYPES,
    PER_EXPERT,
    _to_bf16_bits,
    moe_model_types,
    runnable,
    write_synthetic_moe,
)

ARCHS = list(MOE_TYPES)  # every MoE architecture the writer knows
CASES = [
    (arch, layout, bits)
    for arch in ARCHS
    for layout in ("stacked", "per-expert")
    if layout == "stacked" or arch in PER_EXPERT
    for bits in (4, None)
]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """ckpt(model_type, **kwargs) -> directory, written once per distinct arguments."""
    root = tmp_path_factory.mktemp("synthetic")
    cache = {}

    def get(model_type="qwen3_moe", **kwargs):
        key = repr((model_type, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = write_synthetic_moe(
                root / f"ckpt{len(cache)}", model_type, **kwargs
            )
        return cache[key]

    return get


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def all_tensors(d):
    """name -> (file name, header entry) over every shard of checkpoint `d`."""
    out = {}
    for shard in sorted(Path(d).glob("model*.safetensors")):
        _, header = read_header(shard)
        header.pop("__metadata__")
        for name, entry in header.items():
            assert name not in out, f"{name} is in two shards"
            out[name] = (shard.name, entry)
    return out


def index(d):
    return json.loads((Path(d) / "model.safetensors.index.json").read_text())


def logits_of(d):
    model, tokenizer = mlx_lm.load(str(d))
    model.set_dtype(mx.float32)
    out = model(mx.array([tokenizer.encode(PROMPT)]))
    mx.eval(out)
    return model, np.array(out)


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("arch,layout,bits", CASES, ids=lambda v: str(v))
def test_every_architecture_and_layout_loads_in_mlx_lm(ckpt, arch, layout, bits):
    d = ckpt(arch, layout=layout, bits=bits)
    # Tiny everywhere: no tower or table left at its real-model default size.
    assert sum(p.stat().st_size for p in d.glob("model*.safetensors")) < 64e6
    if not runnable(arch):
        pytest.skip(f"{arch} runs mlx-lm's Metal kernels; no Metal device here")
    _, logits = logits_of(d)
    assert logits.shape[0] == 1 and logits.shape[-1] == 8192
    assert np.isfinite(logits).all()
    # Non-degenerate: spread-out logits that depend on the position.
    assert logits.std() > 0.05
    assert not np.allclose(logits[0, 0], logits[0, -1])


def test_the_writer_knows_every_moe_architecture_of_mlx_lm():
    # A new mlx-lm MoE architecture fails here until synthetic.ARCHS has a config for it.
    missing = set(moe_model_types()) - set(MOE_TYPES) - set(EXCLUDED)
    assert not missing, f"no synthetic config for {sorted(missing)}"
    assert all(EXCLUDED.values()), "every exclusion says why"
    assert not set(EXCLUDED) & set(MOE_TYPES)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("bits", [4, None])
def test_half_precision_checkpoints_load(ckpt, dtype, bits):
    d = ckpt("qwen3_moe", bits=bits, dtype=dtype)
    st = {"bfloat16": "BF16", "float16": "F16"}[dtype]
    float_dtypes = {e["dtype"] for _, e in all_tensors(d).values()} - {"U32"}
    assert float_dtypes == {st}
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == dtype
    _, logits = logits_of(d)
    assert np.isfinite(logits).all()


def test_dense_llama_has_no_experts(ckpt):
    d = ckpt("llama")
    names = all_tensors(d)
    assert not [n for n in names if "switch_mlp" in n or ".experts." in n]
    assert index(d)["metadata"]["expert_size"] == 0
    _, logits = logits_of(d)
    assert np.isfinite(logits).all()


# ---------------------------------------------------------------- files


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("qwen3_moe", dict(bits=4)),
        ("mixtral", dict(layout="per-expert", bits=None, dtype="bfloat16")),
        ("gpt_oss", dict(bits=8)),
    ],
)
def test_safetensors_are_valid_and_the_index_names_every_tensor(ckpt, arch, kwargs):
    d = ckpt(arch, **kwargs)
    tensors = all_tensors(d)
    for shard in d.glob("model*.safetensors"):
        n, header = read_header(shard)
        assert n % 8 == 0
        assert header.pop("__metadata__") == {"format": "mlx"}
        spans = sorted(tuple(e["data_offsets"]) for e in header.values())
        assert spans[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "not contiguous"
        assert shard.stat().st_size == 8 + n + spans[-1][1]
        with safe_open(shard, framework="numpy") as f:
            assert set(f.keys()) == set(header)
    idx = index(d)
    assert idx["weight_map"] == {name: f for name, (f, _) in tensors.items()}
    sizes = [e["data_offsets"][1] - e["data_offsets"][0] for _, e in tensors.values()]
    assert idx["metadata"]["total_size"] == sum(sizes)


def test_stacked_layout_is_the_mlx_community_one(ckpt):
    t = all_tensors(ckpt("qwen3_moe", bits=4))
    # tiny: 8 experts, hidden 128, expert width 64; 4-bit packs 8 codes per uint32.
    w = t["model.layers.0.mlp.switch_mlp.gate_proj.weight"][1]
    assert (w["dtype"], w["shape"]) == ("U32", [8, 64, 128 // 8])
    assert t["model.layers.0.mlp.switch_mlp.gate_proj.scales"][1]["shape"] == [8, 64, 2]
    assert t["model.layers.0.mlp.switch_mlp.down_proj.weight"][1]["shape"] == [8, 128, 8]
    # The router is 8-bit, as qwen3_moe's quant_predicate asks, and config says so.
    assert t["model.layers.0.mlp.gate.weight"][1]["shape"] == [8, 128 // 4]
    cfg = json.loads((ckpt("qwen3_moe", bits=4) / "config.json").read_text())
    assert cfg["quantization"]["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    assert cfg["quantization_config"] == cfg["quantization"]

    # Other architectures keep their own module paths.
    assert "model.layers.1.mlp.experts.down_proj.bias" in all_tensors(ckpt("gpt_oss"))
    mixtral = all_tensors(ckpt("mixtral"))
    assert "model.layers.1.block_sparse_moe.switch_mlp.up_proj.biases" in mixtral


def test_per_expert_layout_has_one_tensor_per_expert(ckpt):
    qwen2 = all_tensors(ckpt("qwen2_moe", layout="per-expert", bits=4))
    assert not [n for n in qwen2 if "switch_mlp" in n]
    for e in range(8):
        for k in ("weight", "scales", "biases"):
            assert f"model.layers.1.mlp.experts.{e}.down_proj.{k}" in qwen2
    w = qwen2["model.layers.1.mlp.experts.7.gate_proj.weight"][1]
    assert (w["dtype"], w["shape"]) == ("U32", [64, 128 // 8])

    mixtral = all_tensors(ckpt("mixtral", layout="per-expert", bits=None))
    assert mixtral["model.layers.0.block_sparse_moe.experts.3.w1.weight"][1]["shape"] == [64, 128]
    assert mixtral["model.layers.0.block_sparse_moe.experts.3.w2.weight"][1]["shape"] == [128, 64]


def test_qwen3_per_expert_keeps_experts_unquantized(ckpt):
    # qwen3_moe's sanitize() stacks only `.weight`, so experts stay float while
    # everything else is 4-bit, and config.json does not claim otherwise.
    d = ckpt("qwen3_moe", layout="per-expert", bits=4)
    t = all_tensors(d)
    assert t["model.layers.0.mlp.experts.0.up_proj.weight"][1]["dtype"] == "F32"
    assert "model.layers.0.mlp.experts.0.up_proj.scales" not in t
    assert "model.layers.0.self_attn.q_proj.scales" in t
    model, _ = logits_of(d)
    layer = model.model.layers[0]
    assert type(layer.mlp.switch_mlp.up_proj) is SwitchLinear
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)


def test_shards_split_by_size_without_splitting_a_tensor(ckpt):
    d = ckpt("qwen3_moe", bits=4, max_shard_bytes=300_000)
    shards = sorted(p.name for p in d.glob("model*.safetensors"))
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    stacked = all_tensors(d)["model.layers.0.mlp.switch_mlp.gate_proj.weight"][1]
    assert stacked["shape"][0] == 8  # all experts, in one shard
    _, logits = logits_of(d)
    assert np.isfinite(logits).all()


def test_rewriting_a_directory_replaces_stale_shards(tmp_path):
    write_synthetic_moe(tmp_path, "olmoe", max_shard_bytes=300_000)
    assert len(list(tmp_path.glob("model*.safetensors"))) > 1
    write_synthetic_moe(tmp_path, "olmoe")
    assert [p.name for p in tmp_path.glob("model*.safetensors")] == [
        "model-00001-of-00001.safetensors"
    ]
    assert (tmp_path / "config.json").exists()


# ---------------------------------------------------------------- values


def shard_digest(d):
    h = hashlib.sha256()
    for shard in sorted(Path(d).glob("model*.safetensors")):
        h.update(shard.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_and_layout_does_not_change_the_model(ckpt):
    assert shard_digest(ckpt("mixtral", seed=1)) == shard_digest(
        write_synthetic_moe(ckpt("mixtral", seed=1).parent / "again", "mixtral", seed=1)
    )
    assert shard_digest(ckpt("mixtral", seed=1)) != shard_digest(ckpt("mixtral", seed=2))
    # Expert values are keyed by module and expert, so both layouts are one model.
    _, stacked = logits_of(ckpt("mixtral", bits=None))
    _, per_expert = logits_of(ckpt("mixtral", layout="per-expert", bits=None))
    np.testing.assert_array_equal(stacked, per_expert)


def test_quantized_experts_dequantize_to_a_linear_init(ckpt):
    model, logits = logits_of(ckpt("qwen3_moe", bits=4))
    proj = model.model.layers[0].mlp.switch_mlp.gate_proj
    assert isinstance(proj, QuantizedSwitchLinear) and proj.bits == 4
    w = np.array(mx.dequantize(proj.weight[0], proj.scales[0], proj.biases[0], 64, 4))
    bound = 1 / np.sqrt(128)  # ~ U(-1/sqrt(in), 1/sqrt(in)), up to the scale jitter
    assert np.abs(w).max() <= 1.25 * bound + 1e-6
    assert 0.7 < w.std() / (bound / np.sqrt(3)) < 1.3
    assert abs(w.mean()) < 0.05 * bound

    # The experts matter: silencing one layer's experts changes the logits.
    down = model.model.layers[0].mlp.switch_mlp.down_proj
    down.scales = mx.zeros_like(down.scales)
    down.biases = mx.zeros_like(down.biases)
    tok = mlx_lm.load(str(ckpt("qwen3_moe", bits=4)))[1]
    silenced = np.array(model(mx.array([tok.encode(PROMPT)])))
    assert np.abs(silenced - logits).max() > 1e-2


def test_bf16_conversion_rounds_like_mlx():
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    x[:3] = [1.00390625, 1.01171875, -3.0e38]  # ties to even, and a large value
    want = np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
    np.testing.assert_array_equal(_to_bf16_bits(x), want)


# ---------------------------------------------------------------- real geometry


def test_qwen3_30b_a3b_geometry_has_real_expert_sizes(ckpt):
    # One layer and 4 of the 128 experts: per-expert sizes are those of the real model.
    d = ckpt(
        "qwen3_moe",
        geometry="qwen3-30b-a3b",
        num_layers=1,
        bits=4,
        overrides={"num_experts": 4, "num_experts_per_tok": 2},
    )
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["head_dim"]) == (2048, 768, 128)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (32, 4)
    assert cfg["rope_theta"] == 1e6 and cfg["norm_topk_prob"] is True

    t = all_tensors(d)
    per_expert_bytes = {
        # 4-bit: 8 codes per uint32 word; one float32 scale and bias per 64 inputs.
        "gate_proj.weight": ([4, 768, 2048 // 8], "U32", 768 * 2048 // 2),  # 786432
        "up_proj.weight": ([4, 768, 2048 // 8], "U32", 768 * 2048 // 2),
        "down_proj.weight": ([4, 2048, 768 // 8], "U32", 2048 * 768 // 2),
        "gate_proj.scales": ([4, 768, 2048 // 64], "F32", 768 * 32 * 4),  # 98304
        "down_proj.biases": ([4, 2048, 768 // 64], "F32", 2048 * 12 * 4),
    }
    for suffix, (shape, dtype, nbytes) in per_expert_bytes.items():
        e = t[f"model.layers.0.mlp.switch_mlp.{suffix}"][1]
        assert (e["shape"], e["dtype"]) == (shape, dtype)
        start, end = e["data_offsets"]
        assert end - start == 4 * nbytes
    one_expert = 3 * (768 * 2048 // 2 + 2 * 768 * 32 * 4)
    assert index(d)["metadata"]["expert_size"] == 4 * one_expert

    _, logits = logits_of(d)
    assert np.isfinite(logits).all()


# ---------------------------------------------------------------- errors and CLI


@pytest.mark.parametrize(
    "model_type,kwargs",
    [
        ("gpt_oss", dict(layout="per-expert")),  # HF gpt_oss fuses gate_up_proj
        ("granitemoe", dict(layout="per-expert")),  # HF granitemoe fuses input_linear
        ("llama", dict(layout="per-expert")),  # no experts at all
        ("gpt_oss", dict(num_layers=1)),  # needs a sliding and a full attention layer
        ("qwen3_moe", dict(bits=7)),
        ("qwen3_moe", dict(dtype="int8")),
        ("qwen3_moe", dict(geometry="huge")),
        ("dbrx-nope", {}),
    ],
)
def test_unsupported_requests_raise_value_error(tmp_path, model_type, kwargs):
    with pytest.raises(ValueError):
        write_synthetic_moe(tmp_path / "x", model_type, **kwargs)
    assert not (tmp_path / "x" / "config.json").exists()


def test_cli_writes_and_summarizes(tmp_path, capsys):
    path = Path(__file__).resolve().parent.parent / "scripts" / "make_synthetic_moe.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_moe", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli"
    cli.main([str(out), "--model-type", "olmoe", "--bits", "0", "--layers", "1",
              "--set", "num_experts=4", "--set", "num_experts_per_tok=2"])
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(out)) and "total_bytes=" in line and "expert_bytes=" in line
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_experts"]) == (1, 4)
    assert "quantization" not in cfg
