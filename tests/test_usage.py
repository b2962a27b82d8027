"""Activation statistics: exact counts of what the router chose (checked against stock mlx_lm's
routing), exponential decay by half-life in tokens, and co-activation counts."""

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx.generate import generate_step
from chronos_mlx.usage import ActivationStats

from conftest import DEMO


def _random_passes(rng, n_passes, num_experts=16, k=4):
    """Forward passes as the runtime reports them: flat tokens x k expert ids, prefill and decode."""
    out = []
    for i in range(n_passes):
        tokens = int(rng.integers(2, 40)) if i % 10 == 0 else 1
        out.append(np.stack([rng.permutation(num_experts)[:k] for _ in range(tokens)]).reshape(-1).astype(np.uint32))
    return out


def test_counts_and_coactivation_are_exact():
    rng = np.random.default_rng(0)
    stats = ActivationStats(num_layers=2, num_experts=16, top_k=4)
    totals = np.zeros((2, 16), dtype=np.int64)
    co = np.zeros((2, 16, 16), dtype=np.int64)
    for i, ids in enumerate(_random_passes(rng, 300)):
        layer = i % 2
        stats.observe(layer, ids)
        for token in ids.reshape(-1, 4).astype(int):
            totals[layer, token] += 1
            co[layer][np.ix_(token, token)] += 1
    np.testing.assert_array_equal(stats.totals, totals)
    np.testing.assert_array_equal(stats.coactivation, co)
    assert (stats.tokens * 4 == stats.totals.sum(axis=1)).all()
    np.testing.assert_allclose(stats.frequencies().sum(axis=1), 4.0)


def test_decay_halves_a_count_every_half_life_of_tokens():
    stats = ActivationStats(num_layers=1, num_experts=8, top_k=2, half_life_tokens=10)
    stats.observe(0, np.array([0, 1] * 4))  # 4 tokens on experts 0 and 1
    for _ in range(10):  # 10 tokens elsewhere: one half-life
        stats.observe(0, np.array([2, 3]))
    assert abs(stats.counts[0, 0] - 2.0) < 1e-9
    for _ in range(20):  # two more
        stats.observe(0, np.array([4, 5]))
    assert abs(stats.counts[0, 0] - 0.5) < 1e-9
    assert list(stats.hot(0, 2)) == [4, 5] and list(stats.hot(0, 2, decayed=False)) == [4, 5]
    assert stats.totals[0, 0] == 4  # raw counts never decay


def test_batched_folding_equals_one_update_per_pass():
    """observe() only queues; folding many passes at once must give the sequential result."""
    rng = np.random.default_rng(1)
    stats = ActivationStats(num_layers=1, num_experts=16, top_k=4, half_life_tokens=7)
    reference = np.zeros(16)
    for ids in _random_passes(rng, 500):
        stats.observe(0, ids)
        reference *= 0.5 ** ((len(ids) // 4) / 7)
        reference += np.bincount(ids.astype(int), minlength=16)
    np.testing.assert_allclose(stats.counts[0], reference, rtol=1e-9)


@pytest.mark.parametrize("sync", ["per-layer", "optimistic"])
def test_observer_sees_exactly_stock_mlx_lm_routing(demo_prompt_ids, sync):
    """Attached to a model streamed at a small budget, the statistics count the same expert
    choices stock mlx_lm's router makes on the same prompt and greedy continuation."""
    from mlx_lm import load

    from chronos_mlx.traces import record_traces

    stock, tokenizer = load(str(DEMO))
    stock.set_dtype(mx.float32)
    trace = record_traces(stock, tokenizer, [demo_prompt_ids], max_tokens=8, keep_hidden=False)
    experts = trace.sequences[0].experts.astype(int)  # [layers, tokens, k]

    model, _, runtime = chronos_mlx.load(None, expert_budget=0.25)
    stats = ActivationStats.for_runtime(runtime)
    list(generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=8, sync=sync))
    stats.detach(runtime)
    assert not runtime.observers
    for layer in range(len(runtime.cache.layers)):
        np.testing.assert_array_equal(stats.totals[layer], np.bincount(experts[layer].reshape(-1), minlength=64))
    assert (stats.tokens == experts.shape[1]).all()
