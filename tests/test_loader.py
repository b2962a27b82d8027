"""chronos_mlx.load: same tokens and logits as stock mlx_lm, for every architecture, layout and budget.

The model chronos returns is driven here by mlx_lm's own `generate_step` (per-layer routing)
and by chronos's decode loop (optimistic routing); both must match stock mlx_lm exactly.
"""

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx.errors import BudgetError, ModelError
from chronos_mlx.generate import generate_step
from synthetic import write_synthetic_moe

from conftest import DEMO, stock_greedy

N_TOKENS = 10


def _mlx_lm_path(model, prompt, n):
    from mlx_lm.generate import generate_step as stock_step

    out = [(int(t), lp) for t, lp in stock_step(mx.array(prompt), model, max_tokens=n)]
    return [t for t, _ in out], [lp for _, lp in out]


def _chronos_path(model, runtime, prompt, n, sync="optimistic"):
    out = [(t, lp) for t, lp in generate_step(mx.array(prompt), model, runtime, max_tokens=n, sync=sync)]
    return [t for t, _ in out], [lp for _, lp in out]


def _assert_same(ref, got):
    ref_ids, ref_lp = ref
    ids, lp = got
    assert ids == ref_ids
    for a, b in zip(ref_lp, lp):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=1e-4)


CASES = [
    ("qwen3_moe", "stacked", 4),
    ("qwen3_moe", "per-expert", None),
    ("qwen2_moe", "stacked", 4),  # shared expert + shared_expert_gate
    ("qwen2_moe", "per-expert", 4),
    ("mixtral", "stacked", 4),
    ("mixtral", "per-expert", None),
    ("deepseek_v2", "per-expert", 4),
    ("olmoe", "stacked", None),
    ("phimoe", "stacked", 4),
    ("granitemoe", "stacked", 4),
    ("gpt_oss", "stacked", 4),
]


@pytest.fixture(scope="module")
def synthetic_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        case: write_synthetic_moe(root / "-".join(map(str, case)), case[0], layout=case[1], bits=case[2], seed=3)
        for case in CASES
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_synthetic_architectures_match_stock_at_every_budget(synthetic_models, case):
    path = synthetic_models[case]
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, 8000, size=40).tolist()  # 40 tokens x top-2: sorted path and waves
    ref = stock_greedy(path, prompt, N_TOKENS)
    info = chronos_mlx.loader.plan_model(path).info
    smallest = info["top_k"] / info["num_experts"]
    for budget in (1.0, 0.5, smallest):
        model, _, runtime = chronos_mlx.load(path, expert_budget=budget)
        _assert_same(ref, _mlx_lm_path(model, prompt, N_TOKENS))
        _assert_same(ref, _chronos_path(model, runtime, prompt, N_TOKENS))
        if budget < 1.0:
            assert runtime.stats()["misses"] > 0  # the streaming path really ran


@pytest.mark.parametrize("budget", [1.0, 0.5, 0.125])
def test_demo_model_matches_stock(demo_prompt_ids, budget):
    ref = stock_greedy(DEMO, demo_prompt_ids, 24)
    model, _, runtime = chronos_mlx.load(None, expert_budget=budget)
    _assert_same(ref, _chronos_path(model, runtime, demo_prompt_ids, 24))
    _assert_same(ref, _chronos_path(model, runtime, demo_prompt_ids, 24, sync="per-layer"))
    _assert_same(ref, _mlx_lm_path(model, demo_prompt_ids, 24))


def test_runtime_reports_budget_in_experts_per_layer():
    _, _, runtime = chronos_mlx.load(None, expert_budget=0.25)
    info = runtime.info
    assert info["num_experts"] == 64 and info["top_k"] == 8 and info["moe_layers"] == 8
    assert info["slots_per_layer"] == 16
    assert runtime.stats()["expert_budget_bytes"] == 16 * 8 * info["bytes_per_expert"]


def test_a_model_without_moe_layers_runs_unchanged_with_a_notice(tmp_path):
    path = write_synthetic_moe(tmp_path / "llama", "llama", bits=4)
    prompt = [5, 6, 7, 8]
    ref = stock_greedy(path, prompt, 6)
    model, _, runtime = chronos_mlx.load(path, expert_budget=0.5)
    assert "no MoE layers" in runtime.notice
    _assert_same(ref, _chronos_path(model, runtime, prompt, 6))


def test_split_reads_says_whether_a_batch_goes_to_lio_listio_or_python_threads():
    # Both ways read the same bytes (tests/test_shards.py); the bench sets them side by side.
    assert chronos_mlx.load(None, expert_budget=0.5)[2].reader.lio is True
    assert chronos_mlx.load(None, expert_budget=0.5, split_reads="threads")[2].reader.lio is False
    with pytest.raises(ValueError, match="split_reads='aio'"):
        chronos_mlx.load(None, expert_budget=0.5, split_reads="aio")


def test_budget_too_small_for_one_token_is_a_clear_error():
    with pytest.raises(BudgetError, match="one token uses 8 per layer"):
        chronos_mlx.load(None, expert_budget=0.1)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        chronos_mlx.load(tmp_path / "nope")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        chronos_mlx.load(tmp_path)


def test_unreachable_hub_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot fetch 'nobody-here/no-such-model'"):
        chronos_mlx.load("nobody-here/no-such-model")
