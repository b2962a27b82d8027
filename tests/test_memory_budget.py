"""`--expert-budget auto` (the default) and `--memory-limit`: the budget fits the memory given,
the model streams under it with stock mlx_lm's tokens, the one line says why, and a limit too
small for even one token's experts is one clear error."""

import json

import mlx.core as mx
import pytest
from typer.testing import CliRunner

import chronos_mlx
from chronos_mlx.budget import (
    HEADROOM_FRACTION, PROCESS_OVERHEAD_BYTES, auto_budget, kv_bytes_per_token, parse_memory, resolve_budget,
    slots_for_budget,
)
from chronos_mlx.errors import BudgetError
from chronos_mlx.loader import plan_model
from chronos_mlx.memory import _meminfo, machine_memory

PROMPT = "The history of the Roman Empire begins"


@pytest.fixture(scope="module")
def plan():
    return plan_model(None, "float32")


def limit_for(plan, fraction, context=4096):
    """A memory limit whose room for experts is `fraction` of them (inverting the formula)."""
    info = plan.info
    need = info["dense_bytes"] + kv_bytes_per_token(plan.config, 4) * context + fraction * info["expert_bytes_total"]
    return int((need + PROCESS_OVERHEAD_BYTES * (1 - HEADROOM_FRACTION)) / (1 - HEADROOM_FRACTION)) + 1000


def test_auto_is_everything_where_everything_fits(plan):
    choice = auto_budget(plan.info, plan.config, memory_bytes=64 * 10**9, memory_source="test")
    assert choice.budget == "1.0" and choice.fits and choice.slots_per_layer == 64
    assert "every expert fits" in choice.line()


@pytest.mark.parametrize("fraction", [0.75, 0.5, 0.25])
def test_auto_budget_fits_in_the_limit(plan, fraction):
    limit = limit_for(plan, fraction)
    c = auto_budget(plan.info, plan.config, memory_bytes=limit, memory_source="--memory-limit")
    info = plan.info
    assert not c.fits
    assert c.dense_bytes + c.kv_bytes + c.expert_bytes + c.overhead_bytes + c.headroom_bytes <= limit
    assert c.slots_per_layer == int(fraction * 64 + 1e-9)  # and nothing more would have fitted
    # what load will buy with it is exactly that
    assert slots_for_budget(c.budget, num_layers=8, num_experts=64, top_k=8, bytes_per_expert=info["bytes_per_expert"]) == c.slots_per_layer
    line = c.line()
    assert "--memory-limit" in line and "dense" in line and "KV for 4096 tokens" in line and "headroom" in line


def test_too_small_a_limit_says_what_does_not_fit(plan):
    with pytest.raises(BudgetError, match="cannot run in .* one token's experts"):
        auto_budget(plan.info, plan.config, memory_bytes=limit_for(plan, 0.1), memory_source="--memory-limit")


def test_longer_context_leaves_less_for_experts(plan):
    limit = limit_for(plan, 0.75)
    short = auto_budget(plan.info, plan.config, memory_bytes=limit, context_tokens=1024)
    long = auto_budget(plan.info, plan.config, memory_bytes=limit, context_tokens=6000)
    assert short.slots_per_layer > long.slots_per_layer


def test_kv_bytes_per_token():
    assert kv_bytes_per_token({"num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128}, 2) == 2 * 48 * 4 * 128 * 2
    assert kv_bytes_per_token({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256}, 4) == 2 * 2 * 4 * 64 * 4
    mla = {"num_hidden_layers": 3, "num_attention_heads": 2, "kv_lora_rank": 8, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
    assert kv_bytes_per_token(mla, 2) == 3 * 2 * (24 + 16) * 2


def test_parse_memory():
    assert parse_memory("12GB") == 12 * 10**9
    assert parse_memory("1.5GiB") == int(1.5 * 1024**3)
    assert parse_memory("800 MB") == 800 * 10**6
    for bad in ("0.5", "lots", "12XB", "-1GB"):
        with pytest.raises(BudgetError):
            parse_memory(bad)


def test_machine_memory_is_plausible(tmp_path):
    m = machine_memory()
    assert 0 < m.available_bytes <= m.total_bytes and m.source
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n")
    assert _meminfo(str(f)) == {"MemTotal": 16000000 * 1024, "MemFree": 1000000 * 1024, "MemAvailable": 8000000 * 1024}


def test_python_api_accepts_auto_and_a_memory_limit(plan):
    model, tok, runtime = chronos_mlx.load(None, "auto", dtype="float32", memory_limit=limit_for(plan, 0.5))
    assert runtime.cache.num_slots == 32
    assert resolve_budget("0.25", None) == ("0.25", None)


def test_memory_limit_picks_a_budget_that_fits_and_streams_stock_tokens(plan):
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from chronos_mlx.cli import app

    limit = limit_for(plan, 0.25)
    result = CliRunner().invoke(
        app, ["generate", "-p", PROMPT, "--max-tokens", "8", "--memory-limit", str(limit) + "B", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "expert budget auto = 0.25 (16 experts/layer" in result.stderr
    stats = data["stats"]
    assert stats["slots_per_layer"] == 16 and stats["misses"] > 0 and stats["bytes_read"] > 0
    assert stats["expert_budget_bytes"] <= limit
    model, tokenizer = load(str(chronos_mlx.DEFAULT_MODEL))
    model.set_dtype(mx.float32)
    ids = [int(t) for t, _ in generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=8)]
    assert data["token_ids"] == ids


def test_memory_limit_too_small_is_one_error_line():
    from chronos_mlx.cli import app

    result = CliRunner().invoke(app, ["generate", "-p", PROMPT, "--memory-limit", "100MB"])
    assert result.exit_code == 2
    assert "error:" in result.stderr and "cannot run in" in result.stderr
