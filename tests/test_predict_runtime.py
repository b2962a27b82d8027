"""Predictors attached to a running model change what is prefetched, never the output.

Every predictor, with reads slowed by a simulated SSD so that prefetches are still in
flight when the layer they target is routed, gives stock mlx_lm's greedy tokens."""

import mlx.core as mx
import pytest

import chronos_mlx
from chronos_mlx.errors import ChronosError
from chronos_mlx.generate import generate_step
from chronos_mlx.predict_runtime import PREDICTORS, attach_predictor, default_predictor

from conftest import DEMO, stock_greedy

TOKENS = 12


@pytest.fixture(scope="module")
def reference(demo_prompt_ids):
    return stock_greedy(DEMO, demo_prompt_ids, TOKENS)[0]


@pytest.mark.parametrize("sync", ["per-layer", "optimistic"])
@pytest.mark.parametrize("predictor", PREDICTORS)
def test_every_predictor_gives_stock_tokens(demo_prompt_ids, reference, predictor, sync):
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.25, io_sim="bandwidth=2GB/s,latency=200us")
    attach_predictor(model, runtime, predictor)
    got = [int(t) for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=TOKENS, sync=sync)]
    assert got == reference
    stats = runtime.stats()
    if predictor in ("gate", "lookahead", "all") and sync == "per-layer":
        assert stats["prefetch_hits"] > 0  # the guesses were used, so the test exercised prefetching
        assert 0.0 < stats["prediction_recall"] <= 1.0


def test_unknown_or_untrained_predictors_are_clear_errors(tmp_path):
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.25)
    with pytest.raises(ChronosError, match="unknown predictor"):
        attach_predictor(model, runtime, "oracle")


def test_default_is_none_when_every_expert_fits():
    model, _, runtime = chronos_mlx.load(None, expert_budget=1.0)
    attach_predictor(model, runtime, "all")
    assert runtime.predictor is None and runtime.intent is None
    assert default_predictor(model, runtime) in PREDICTORS


@pytest.mark.parametrize("sync", ["per-layer", "optimistic"])
def test_inline_prefetch_reads_after_each_launch_give_stock_tokens(demo_prompt_ids, reference, sync):
    # No reader threads: the guesses are read on the main thread right after the device
    # was given work (cache.run_deferred), into slots nothing queued reads.
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.25, io_threads=0)
    attach_predictor(model, runtime, "gate")
    got = [int(t) for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=TOKENS, sync=sync)]
    assert got == reference
    assert not runtime.cache.deferred
    if sync == "per-layer":
        assert runtime.stats()["prefetch_hits"] > 0
