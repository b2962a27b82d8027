"""Every MoE architecture of the installed mlx-lm, streamed by chronos, gives stock tokens.

One tiny random-weight checkpoint per architecture (tests/synthetic.py: 8 experts,
top-k 2, 4-bit, sliding windows and attention chunks shorter than the prompt),
written once per module. Stock `mlx_lm` greedy tokens and logprobs are the
reference; chronos must match them at the smallest legal budget (nearly every
step misses) in both sync modes, and at half the experts.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import CacheList, ChunkedKVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear, SwitchMLP
from mlx_lm.utils import MODEL_REMAPPING

import chronos_mlx
from chronos_mlx.generate import generate_step
from conftest import stock_greedy
from synthetic import MOE_TYPES, runnable, write_synthetic_moe

PROMPT_LEN = 40
MAX_TOKENS = 16
ARCHS = list(MOE_TYPES)
# Model types mlx-lm maps onto another one's module: same model, so fewer cases.
ALIASES = {t for t in ARCHS if t in MODEL_REMAPPING}
SYNCS = ("optimistic", "per-layer")


def _prompt():
    return np.random.default_rng(11).integers(1, 8000, size=PROMPT_LEN).tolist()


def _stock_model(path):
    from mlx_lm import load

    model, _ = load(str(path))
    model.set_dtype(mx.float32)
    return model


def _observed_experts(model, prompt) -> list:
    """(num_experts, top_k) of each expert module a forward pass of the stock model calls.

    top_k is what the model routes with (the width of the indices it passes its
    experts), not what a config key says.
    """
    seen = {}
    saved = {cls: cls.__call__ for cls in (SwitchGLU, SwitchMLP)}

    def spy(orig):
        def call(self, x, indices):
            seen[id(self)] = (self, indices.shape[-1])
            return orig(self, x, indices)

        return call

    try:
        for cls, orig in saved.items():
            cls.__call__ = spy(orig)
        mx.eval(model(mx.array([prompt])))
    finally:
        for cls, orig in saved.items():
            cls.__call__ = orig
    out = []
    for module, k in seen.values():
        linears = [m for _, m in module.named_modules() if isinstance(m, (SwitchLinear, QuantizedSwitchLinear))]
        out.append((linears[0].weight.shape[0], k))
    # dbrx: experts are a list of per-expert MLPs under a block that knows its top-k.
    for _, m in model.named_modules():
        experts = m.get("experts") if isinstance(m, nn.Module) else None
        if isinstance(experts, list) and experts and isinstance(experts[0], nn.Module):
            out.append((len(experts), m.num_experts_per_tok))
    return out


def _cache_kinds(cache) -> set:
    kinds = set()
    for c in cache:
        kinds |= _cache_kinds(c.caches) if isinstance(c, CacheList) else {type(c).__name__}
    return kinds


def _windows(cache) -> list:
    out = []
    for c in cache:
        if isinstance(c, CacheList):
            out += _windows(c.caches)
        elif isinstance(c, RotatingKVCache):
            out.append(c.max_size)
        elif isinstance(c, ChunkedKVCache):
            out.append(c.chunk_size)
    return out


@pytest.fixture(scope="module")
def arch_case(tmp_path_factory):
    """arch -> dict(path, stock tokens, experts seen, cache kinds), built once per module."""
    root = tmp_path_factory.mktemp("archs")
    cases = {}

    def get(arch):
        if not runnable(arch):
            pytest.skip(f"{arch} runs mlx-lm's Metal kernels; no Metal device here")
        if arch not in cases:
            path = write_synthetic_moe(root / arch, arch, bits=4, seed=3)
            prompt = _prompt()
            model = _stock_model(path)
            cache = make_prompt_cache(model)
            cases[arch] = dict(
                path=path,
                prompt=prompt,
                layers=len(model.layers),
                experts=_observed_experts(model, prompt),
                kinds=_cache_kinds(cache),
                windows=_windows(cache),
            )
            cases[arch]["tokens"], cases[arch]["logprobs"] = stock_greedy(path, prompt, MAX_TOKENS)
        return cases[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_config_exercises_the_architecture(arch_case, arch):
    case = arch_case(arch)
    assert case["experts"], "no MoE layer"
    assert {n for n, _ in case["experts"]} == {8}
    assert {k for _, k in case["experts"]} <= {1, 2}
    # Sliding windows and attention chunks wrap within the prompt.
    assert all(w < PROMPT_LEN for w in case["windows"]), case["windows"]
    # Hybrids keep attention layers, windowed models keep full-attention ones.
    kinds = case["kinds"]
    if kinds & {"ArraysCache", "MambaCache"}:
        assert kinds & {"KVCache", "RotatingKVCache", "ChunkedKVCache"}, kinds
    if kinds & {"RotatingKVCache", "ChunkedKVCache"}:
        assert "KVCache" in kinds, kinds


@pytest.mark.parametrize("arch", ARCHS)
def test_runtime_reads_the_moe_geometry_from_the_modules(arch_case, arch):
    case = arch_case(arch)
    (num_experts, top_k), = set(case["experts"])
    _, _, runtime = chronos_mlx.load(case["path"], expert_budget=1.0)
    info = runtime.info
    assert (info["num_experts"], info["top_k"]) == (num_experts, top_k)
    assert info["moe_layers"] == len(case["experts"])
    assert info["num_hidden_layers"] == case["layers"]


def _budgets(arch):
    # The smallest budget in both modes for every type; half the experts (fewer
    # misses, more reuse) optimistically, for every module once (time on 2 cores).
    cases = [("min", arch, sync) for sync in SYNCS]
    # At 0.5 the routing is read back only after each step, so every miss is recovered by
    # rolling back this architecture's caches and recomputing (the hardest path).
    return cases + ([] if arch in ALIASES else [(0.5, arch, "optimistic, no segment ends")])


@pytest.mark.parametrize("budget,arch,sync", [c for a in ARCHS for c in _budgets(a)])
def test_streamed_tokens_match_stock(arch_case, budget, arch, sync):
    case = arch_case(arch)
    if budget == "min":  # one token's experts per layer: nearly every step misses
        (num_experts, top_k), = set(case["experts"])
        budget = top_k / num_experts
    model, _, runtime = chronos_mlx.load(case["path"], expert_budget=budget)
    ends = () if sync.endswith("no segment ends") else None
    steps = list(generate_step(mx.array(case["prompt"]), model, runtime, max_tokens=MAX_TOKENS,
                               sync=sync.split(",")[0], segment_ends=ends))
    assert runtime.stats()["misses"] > 0  # experts were streamed, not all resident
    assert [int(t) for t, _ in steps] == case["tokens"]
    # Logprobs too: random weights can make greedy tokens insensitive to a wrong expert.
    for (_, lp), ref in zip(steps, case["logprobs"]):
        np.testing.assert_allclose(np.array(lp), np.array(ref), atol=1e-4)


@pytest.fixture(scope="module")
def float_gpt_oss(tmp_path_factory):
    return write_synthetic_moe(tmp_path_factory.mktemp("float") / "gpt_oss", "gpt_oss", bits=None, seed=3)


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_microscaled_quantization_streams_exactly(float_gpt_oss, tmp_path, mode):
    """mlx-community's gpt-oss checkpoints are mxfp4 (uint8 power-of-two scales, no biases);
    `mlx_lm.convert --q-mode` writes them, and chronos streams them like affine ones."""
    from mlx_lm import convert

    path = tmp_path / mode
    convert(str(float_gpt_oss), str(path), quantize=True, q_mode=mode)
    prompt = _prompt()
    tokens, logprobs = stock_greedy(path, prompt, MAX_TOKENS)
    model, _, runtime = chronos_mlx.load(path, expert_budget=1 / 4)  # top-2 of 8: one token's experts
    assert json.loads((path / "config.json").read_text())["quantization"]["mode"] == mode
    for sync in SYNCS:
        steps = list(generate_step(mx.array(prompt), model, runtime, max_tokens=MAX_TOKENS, sync=sync))
        assert [int(t) for t, _ in steps] == tokens, sync
        for (_, lp), ref in zip(steps, logprobs):
            np.testing.assert_allclose(np.array(lp), np.array(ref), atol=1e-4)
    assert runtime.stats()["misses"] > 0
