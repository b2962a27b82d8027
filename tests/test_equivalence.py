"""equivalence.py (`chronos verify --tokens`): chronos's greedy tokens against stock mlx_lm's,
on whatever device runs it. Here (MLX's CPU backend) they are identical; the check must also
say so when they are not, and refuse what it cannot compare."""

import importlib

import pytest

import chronos_mlx
from chronos_mlx import generate
from chronos_mlx.equivalence import check_against_stock
from chronos_mlx.errors import ChronosError
from synthetic import write_synthetic_moe


def test_the_demo_model_gives_stock_tokens_at_every_budget_and_routing():
    seen = []
    report = check_against_stock(budgets=(0.5, 0.125), routings=("optimistic", "per-layer"), max_tokens=5,
                                 on_check=seen.append)
    assert report.ok
    assert len(report.checks) == 2 * 2 * 2 and seen == report.checks  # budgets x routings x prompts
    assert {c.prompt_tokens for c in report.checks} == {12, 351}  # a short prompt, and one that prefills in waves
    assert report.to_json()["ok"] is True and report.to_json()["device"] == report.device


def _chronos_off_at(monkeypatch, token: int):
    """chronos's decode loop, but another token at index `token` (a fault to be caught)."""
    real = generate.generate_step

    def off(*args, **kwargs):
        for i, (t, logprobs) in enumerate(real(*args, **kwargs)):
            yield (t + 1 if i == token else t), logprobs

    monkeypatch.setattr(generate, "generate_step", off)


def test_a_different_token_is_reported_with_where_it_happened(monkeypatch):
    _chronos_off_at(monkeypatch, 2)
    report = check_against_stock(budgets=(0.5,), routings=("optimistic",), prompts=["Once upon a time"], max_tokens=4)
    assert not report.ok
    assert [(c.exact, c.first_difference) for c in report.checks] == [(False, 2)]


def _stock_that_parts_at(monkeypatch, token: int):
    """Stock mlx_lm's greedy decode, but every second run takes another token at `token`
    (as stock did on CUDA with a random-weight bfloat16 model whose best logits tie)."""
    stock = importlib.import_module("mlx_lm.generate")  # `from mlx_lm import generate` is the function

    real, calls = stock.generate_step, []

    def step(*args, **kwargs):
        calls.append(1)
        second = len(calls) % 2 == 0
        for i, (t, lp) in enumerate(real(*args, **kwargs)):
            yield (t + 1 if second and i == token else t), lp

    monkeypatch.setattr(stock, "generate_step", step)


def test_stock_decodes_each_prompt_twice_and_here_repeats_itself():
    report = check_against_stock(budgets=(0.5,), routings=("optimistic",), prompts=["Once upon a time"], max_tokens=4)
    assert report.stock_repeatable == [4] and report.stock_deterministic
    assert [(c.exact, c.compared, c.tokens) for c in report.checks] == [(True, 4, 4)]


def test_where_stock_is_not_deterministic_only_the_tokens_it_repeats_are_compared(monkeypatch):
    _stock_that_parts_at(monkeypatch, 3)
    report = check_against_stock(budgets=(0.5,), routings=("optimistic",), prompts=["Once upon a time"], max_tokens=6)
    assert report.stock_repeatable == [3] and not report.stock_deterministic
    assert [(c.exact, c.compared, c.tokens) for c in report.checks] == [(True, 3, 6)]
    assert report.ok and report.to_json()["stock_deterministic"] is False


def test_a_difference_before_stock_parts_from_itself_is_still_caught(monkeypatch):
    _stock_that_parts_at(monkeypatch, 3)
    _chronos_off_at(monkeypatch, 1)
    report = check_against_stock(budgets=(0.5,), routings=("optimistic",), prompts=["Once upon a time"], max_tokens=6)
    assert not report.ok
    assert [(c.exact, c.first_difference, c.compared) for c in report.checks] == [(False, 1, 3)]


def test_a_model_stock_cannot_hold_is_refused_before_anything_is_loaded():
    with pytest.raises(ChronosError, match="smaller model of the same architecture"):
        check_against_stock(memory_bytes=1 << 20)


def test_a_model_without_moe_layers_has_nothing_to_compare(tmp_path):
    path = write_synthetic_moe(tmp_path / "llama", "llama", bits=4)
    with pytest.raises(ChronosError, match="no MoE layers"):
        check_against_stock(path)


def test_a_routing_this_machine_cannot_run_is_a_clear_error():
    with pytest.raises(ChronosError, match="cannot run here"):
        check_against_stock(routings=("telepathy",))


def test_the_demo_model_is_the_default():
    report = check_against_stock(budgets=(1.0,), routings=("optimistic",), prompts=["Hello"], max_tokens=2)
    assert report.model.name == chronos_mlx.DEFAULT_MODEL.name and report.ok
