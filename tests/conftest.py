"""Shared fixtures: stock mlx_lm references and small synthetic checkpoints."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from chronos_mlx import DEFAULT_MODEL

DEMO = Path(DEFAULT_MODEL)
PROMPT = "The history of the Roman Empire begins"


def stock_greedy(path, prompt_ids, max_tokens, dtype=mx.float32):
    """Token ids and logprobs that stock mlx_lm produces (greedy), the reference for every test."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))
    model.set_dtype(dtype)
    ids, logprobs = [], []
    for tok, lp in generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens):
        ids.append(int(tok))
        logprobs.append(lp)
    return ids, logprobs


def assert_stock(got: tuple, reference: tuple):
    """(token ids, logprobs) equal stock's (`stock_greedy`'s), token for token and bit for bit."""
    assert got[0] == reference[0]
    for ours, theirs in zip(got[1], reference[1]):
        assert mx.array_equal(ours, theirs)


def stock_replay(path, params, prompt, forced):
    """(token, logprobs) of stock mlx_lm replaying `forced` after `prompt` with trained-like
    routing `params` installed (bench_routing.py), the reference for benchmark routing tests."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from chronos_mlx import bench, bench_routing

    model, _ = load(str(path))
    model.set_dtype(mx.float32)
    bench_routing.install_trained_routing(model, params)
    cache, sampler = bench._decoding(model, prompt, forced, None)
    return [(int(t), lp) for t, lp in generate_step(mx.array(prompt), model, max_tokens=len(forced),
                                                     sampler=sampler, prompt_cache=cache)]


def stock_text(stock, tokens: list) -> str:
    """The text mlx_lm's detokenizer makes of `tokens` (stock = (model, tokenizer))."""
    detok = stock[1].detokenizer
    detok.reset()
    for t in tokens:
        detok.add_token(t)
    detok.finalize()
    return detok.text


def synthetic_models(root, cases: dict) -> dict:
    """{name: checkpoint path}: the demo model for (None), else a small random checkpoint
    written under `root` for (model_type, seed) (4-bit, the writer's defaults)."""
    from synthetic import write_synthetic_moe

    return {
        name: DEMO if case is None else write_synthetic_moe(root / name.split()[0], case[0], bits=4, seed=case[1])
        for name, case in cases.items()
    }


@pytest.fixture(scope="session")
def demo_prompt_ids():
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(DEMO).encode(PROMPT)


@pytest.fixture(scope="session")
def moe64(tmp_path_factory):
    """Stacked qwen3_moe with the demo's expert geometry (64 experts, top-8), 4 small layers."""
    from synthetic import write_synthetic_moe

    return write_synthetic_moe(tmp_path_factory.mktemp("moe64") / "m", "qwen3_moe", bits=4, seed=3,
                               geometry={"num_experts": 64, "top_k": 8, "num_layers": 4})


@pytest.fixture(scope="session")
def demo_f32(tmp_path_factory):
    """The demo checkpoint with its bf16 tensors stored as float32: the same model (every bf16 is
    a float32 exactly), whose experts on CPU need no conversion, as on a GPU in bf16 — what
    copies from staging (device-wait's pulled loads) are made for."""
    import shutil

    path = tmp_path_factory.mktemp("demo-f32") / "demo-moe-f32"
    shutil.copytree(DEMO, path)
    weights = mx.load(str(path / "model.safetensors"))
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v for k, v in weights.items()},
                        metadata={"format": "mlx"})
    return path


@pytest.fixture(scope="module")
def stock_demo():
    """Stock mlx_lm's demo model at float32: its own SwitchGLU modules are the reference."""
    from mlx_lm import load

    model, _ = load(str(DEMO))
    model.set_dtype(mx.float32)
    return model


def demo_switch(model, layer):
    """The expert module of a demo model's MoE layer (stock SwitchGLU or chronos's StreamingSwitch)."""
    return model.model.layers[layer].mlp.switch_mlp


def switch_inputs(seed, n_tokens=1):
    """(hidden states, top-8 expert ids) a demo MoE layer's experts are called with."""
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((1, n_tokens, 384)).astype(np.float32))
    inds = mx.array(np.stack([rng.choice(64, 8, replace=False) for _ in range(n_tokens)])[None].astype(np.uint32))
    return x, inds

