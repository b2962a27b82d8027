"""The decode loop: optimistic routing recovers exactly from misses, KV caches included."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import chronos_mlx
from chronos_mlx.generate import generate_step, stream_generate

from conftest import DEMO, synthetic_models


def _stock(path, prompt, n):
    from mlx_lm import load
    from mlx_lm.generate import generate_step as stock_step

    model, _ = load(str(path))
    model.set_dtype(mx.float32)
    cache = make_prompt_cache(model)
    ids = [int(t) for t, _ in stock_step(mx.array(prompt), model, max_tokens=n, prompt_cache=cache)]
    return ids, cache


def _kv(cache):
    out = []
    for c in cache:
        k, v = c.state[0], c.state[1]
        out.append((c.offset, np.array(k[..., : c.offset, :]), np.array(v[..., : c.offset, :])))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cases = {"demo": None, "mixtral": ("mixtral", 5), "qwen2_moe": ("qwen2_moe", 6)}
    return synthetic_models(tmp_path_factory.mktemp("gen"), cases)


@pytest.mark.parametrize("name", ["demo", "mixtral", "qwen2_moe"])
def test_forced_misses_recover_to_stock_tokens_and_kv_cache(models, name):
    path = models[name]
    prompt = np.random.default_rng(2).integers(1, 8000, size=30).tolist()
    ref_ids, ref_cache = _stock(path, prompt, 16)
    info = chronos_mlx.loader.plan_model(path).info
    # The smallest legal budget: one token's experts per layer, so nearly every step misses.
    model, _, runtime = chronos_mlx.load(path, expert_budget=info["top_k"] / info["num_experts"])
    cache = make_prompt_cache(model)
    # No segment ends: every miss is found after the step and recovered by rollback + recompute.
    ids = [t for t, _ in generate_step(mx.array(prompt), model, runtime, max_tokens=16, prompt_cache=cache, segment_ends=())]
    assert ids == ref_ids
    stats = runtime.stats()
    assert stats["recomputes"] > 0 and stats["recomputed_layers"] >= stats["recomputes"]
    # Waiting out the thrown-away steps is counted apart from I/O (the planner weighs it as
    # this plan's cost), and so is waiting for the routing read back after each step.
    assert stats["decode_recovery_wait_s"] > 0 and stats["decode_sync_wait_s"] > 0
    for (o1, k1, v1), (o2, k2, v2) in zip(_kv(ref_cache), _kv(cache)):
        assert o1 == o2
        np.testing.assert_allclose(k1, k2, atol=1e-5)
        np.testing.assert_allclose(v1, v2, atol=1e-5)


@pytest.mark.parametrize("sync", ["optimistic", "per-layer"])
def test_loads_split_over_parallel_reads_give_stock_tokens(demo_prompt_ids, sync, monkeypatch):
    # Every batch split (lio_listio where Linux glibc has it, Python threads elsewhere): the
    # pieces of one expert land in its slot whatever order they arrive in.
    from chronos_mlx import lio

    ref_ids, _ = _stock(DEMO, demo_prompt_ids, 12)
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.25)
    reader = runtime.cache.reader
    reader.threads, reader.min_bytes_per_thread = 4, 1
    calls = []
    real = lio.read_pieces
    monkeypatch.setattr(lio, "read_pieces", lambda pieces: (calls.append(len(pieces)), real(pieces))[1])
    ids = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=12, sync=sync)]
    assert ids == ref_ids
    assert runtime.stats()["decode_misses"] > 0
    assert bool(calls) == lio.available()


def test_a_step_likely_to_miss_is_verified_before_the_next_is_launched_on_it(demo_prompt_ids):
    # At a quarter of the experts nearly every step misses somewhere: a step launched behind
    # it would be thrown away after being waited for (a whole step of device time).
    ref_ids, _ = _stock(DEMO, demo_prompt_ids, 12)
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.25)
    ids = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=12, segment_ends=())]
    assert ids == ref_ids
    stats = runtime.stats()
    assert stats["recomputes"] > 0 and stats["settled_first"] >= 8
    assert stats["discarded_steps"] <= 2  # only while the miss estimates were still low


def test_a_miss_in_the_middle_of_a_token_is_recomputed(demo_prompt_ids):
    """Evict, between two steps, an expert the next token needs in its last layer only."""
    ref_ids, _ = _stock(DEMO, demo_prompt_ids, 12)
    model, _, runtime = chronos_mlx.load(None, expert_budget=1.0)  # all resident: steps speculate
    gen = generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=12)
    ids = [next(gen)[0]]
    last = runtime.cache.layers[-1]
    resident = np.flatnonzero(last.slot_of >= 0)
    for e in resident.tolist():  # empty the last layer: every expert it needs must be reloaded
        slot = last.slot_of[e]
        last.slot_of[e], last.expert_in[slot] = -1, -1
        last.policy.removed(e)
    runtime.cache._sync_table(last)
    before = runtime.stats()
    ids += [t for t, _ in gen]
    assert ids == ref_ids
    after = runtime.stats()
    assert after["recomputes"] > before["recomputes"]
    # Only the last of the 8 MoE layers missed, so only it was recomputed.
    assert after["recomputed_layers"] - before["recomputed_layers"] == after["recomputes"] - before["recomputes"]


def test_everything_resident_costs_one_host_read_per_token(demo_prompt_ids):
    model, _, runtime = chronos_mlx.load(None, expert_budget=1.0)
    list(generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=16))
    stats = runtime.stats()
    assert stats["recomputes"] == 0 and stats["misses"] == 0
    assert stats["host_syncs_per_token"] <= 2


def test_with_every_expert_resident_decode_steps_are_built_like_plain_mlx_lm_steps(demo_prompt_ids):
    # Nothing can miss, so nothing is recorded for a verification that cannot fail: no step
    # record, no resume outputs, nothing for the segment planner (Python work per token is
    # what limits decoding where compute is fast). The prompt step may still be speculative.
    model, _, runtime = chronos_mlx.load(None, expert_budget=1.0)
    entered = []
    real = runtime.recording

    def recording(ends=frozenset()):
        entered.append(ends)
        return real(ends)

    runtime.recording = recording
    got = [int(t) for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=16)]
    assert len(entered) <= 1
    assert got == [int(t) for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=16,
                                                     sync="per-layer")]


def test_per_layer_routing_reads_indices_once_per_moe_layer(demo_prompt_ids):
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.5)
    list(generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=8, sync="per-layer"))
    stats = runtime.stats()
    assert stats["host_syncs_per_token"] > 8  # 8 MoE layers, plus the token itself
    assert stats["decode_sync_wait_s"] > 0 and stats["decode_recovery_wait_s"] == 0  # nothing is thrown away


def test_stream_generate_yields_text_and_stops_at_max_tokens(demo_prompt_ids):
    model, tokenizer, runtime = chronos_mlx.load(None, expert_budget=0.25)
    pieces = list(stream_generate(model, tokenizer, "The Roman Empire", runtime, max_tokens=10))
    assert len([p for p in pieces if p.token >= 0]) <= 10
    assert "".join(p.text for p in pieces)
    assert pieces[-1].finish_reason in ("length", "stop")


def test_unknown_sync_mode_is_rejected(demo_prompt_ids):
    model, _, runtime = chronos_mlx.load(None, expert_budget=1.0)
    with pytest.raises(ValueError, match="sync must be 'auto' or one of"):
        next(generate_step(mx.array(demo_prompt_ids), model, runtime, sync="sometimes"))


def test_auto_routing_is_device_wait_where_mlx_runs_on_cuda_and_optimistic_elsewhere(monkeypatch):
    from chronos_mlx import device_wait
    from chronos_mlx.generate import resolve_sync

    assert resolve_sync("per-layer") == "per-layer"  # a mode asked for is kept
    monkeypatch.setattr(device_wait, "available", lambda: False)
    assert resolve_sync("auto") == "optimistic"
    monkeypatch.setattr(device_wait, "available", lambda: True)
    assert resolve_sync("auto") == "device-wait"
    _, _, half = chronos_mlx.load(None, expert_budget=0.5)
    _, _, whole = chronos_mlx.load(None, expert_budget=1.0)
    assert resolve_sync("auto", half) == "device-wait"
    assert resolve_sync("auto", whole) == "optimistic"  # every expert resident: nothing can miss


def test_stopping_early_leaves_the_kv_cache_exactly_as_stock(demo_prompt_ids):
    from mlx_lm import load
    from mlx_lm.generate import generate_step as stock_step

    stock, _ = load(str(DEMO))
    stock.set_dtype(mx.float32)
    ref_cache = make_prompt_cache(stock)
    gen = stock_step(mx.array(demo_prompt_ids), stock, max_tokens=50, prompt_cache=ref_cache)
    ref = [int(next(gen)[0]) for _ in range(6)]
    gen.close()

    model, _, runtime = chronos_mlx.load(None, expert_budget=1.0)
    last = runtime.cache.layers[3]  # force misses: layer 3 loses half its experts
    for e in range(0, 64, 2):
        slot = last.slot_of[e]
        last.slot_of[e], last.expert_in[slot] = -1, -1
        last.policy.removed(e)
    runtime.cache._sync_table(last)
    cache = make_prompt_cache(model)
    gen = generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=50, prompt_cache=cache)
    ids = [next(gen)[0] for _ in range(6)]
    gen.close()
    assert ids == ref
    for (o1, k1, v1), (o2, k2, v2) in zip(_kv(ref_cache), _kv(cache)):
        assert o1 == o2
        np.testing.assert_allclose(k1, k2, atol=1e-5)
        np.testing.assert_allclose(v1, v2, atol=1e-5)


@pytest.mark.parametrize("sync", ["optimistic", "per-layer"])
def test_logits_processors_see_the_tokens_stock_mlx_lm_gives_them(demo_prompt_ids, stock_demo, sync):
    """A repetition penalty and a logit bias (mlx_lm's own processors) change the greedy
    tokens; under misses, with steps computed again, chronos still gives stock's."""
    from mlx_lm.generate import generate_step as stock_step
    from mlx_lm.sample_utils import make_logits_processors

    def processors():
        return make_logits_processors(logit_bias={11: 3.0, 198: -5.0}, repetition_penalty=1.5,
                                      repetition_context_size=8)

    stock_model = stock_demo
    plain = [int(t) for t, _ in stock_step(mx.array(demo_prompt_ids), stock_model, max_tokens=16)]
    want = [int(t) for t, _ in stock_step(mx.array(demo_prompt_ids), stock_model, max_tokens=16,
                                          logits_processors=processors())]
    assert want != plain  # the processors matter here
    model, _, runtime = chronos_mlx.load(None, 0.25, dtype="float32")
    got = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=16, sync=sync,
                                       logits_processors=processors())]
    assert got == want
    assert runtime.total_misses() > 0
