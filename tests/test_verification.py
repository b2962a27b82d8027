"""Segmented verification: where a step reads its routing back changes speed, never tokens.

Segment ends are forced everywhere (every MoE layer: per-layer routing inside an
optimistic step), nowhere (one read after the whole step) and at random layers, at the
smallest budget so that nearly every step misses somewhere, on a plain model, one with a
shared expert, a hybrid with linear-attention caches and one with a sliding window shorter
than the text. The reference is stock mlx_lm.
"""

import random

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx.generate import generate_step
from chronos_mlx.verification import SegmentPlanner, expected_redo, plan_ends

from conftest import synthetic_models

TOKENS = 12


def test_no_misses_means_no_segment_ends():
    assert plan_ends(np.zeros(48), sync_s=1e-3, layer_s=1e-3, recovery_s=1e-3) == frozenset()


def test_certain_misses_and_cheap_round_trips_end_every_layer():
    assert plan_ends(np.full(8, 0.9), sync_s=1e-5, layer_s=1e-3, recovery_s=1e-3) == frozenset(range(8))


def test_rare_misses_and_dear_round_trips_give_few_long_segments():
    ends = plan_ends(np.full(48, 0.05), sync_s=1e-3, layer_s=3e-4, recovery_s=2e-3)
    assert 1 <= len(ends) <= 8 and max(ends) == 47


def test_a_layer_that_always_misses_ends_its_own_segment():
    miss = np.zeros(16)
    miss[9] = 1.0
    assert 9 in plan_ends(miss, sync_s=2e-4, layer_s=1e-3, recovery_s=1e-3)


def test_the_planner_learns_which_layers_miss_and_what_a_step_costs():
    planner = SegmentPlanner(4, miss=np.zeros(4), decay=0.5)
    for _ in range(6):
        planner.observe_misses([0, 1, 2, 3], {2})
    assert planner.miss[2] > 0.9 and planner.miss[0] == 0.0
    rng = np.random.default_rng(0)
    for _ in range(200):  # seconds = 2 ms + 0.5 ms per end + 1 ms per recomputed layer
        ends, redo = int(rng.integers(0, 5)), int(rng.integers(0, 4))
        planner.observe_step(2e-3 + 5e-4 * ends + 1e-3 * redo, ends, redo, int(redo > 0))
    base, sync, layer, _ = planner.coefficients()
    assert base == pytest.approx(2e-3, rel=0.05) and sync == pytest.approx(5e-4, rel=0.05)
    assert layer == pytest.approx(1e-3, rel=0.1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cases = {
        "plain (demo)": None,
        "shared expert (qwen2_moe)": ("qwen2_moe", 6),
        "hybrid (qwen3_next)": ("qwen3_next", 7),
        "sliding window (gpt_oss)": ("gpt_oss", 8),
    }
    return synthetic_models(tmp_path_factory.mktemp("segments"), cases)


def _stock(path, prompt):
    from mlx_lm import load
    from mlx_lm.generate import generate_step as stock_step

    model, _ = load(str(path))
    model.set_dtype(mx.float32)
    return [int(t) for t, _ in stock_step(mx.array(prompt), model, max_tokens=TOKENS)]


@pytest.mark.parametrize("name", ["plain (demo)", "shared expert (qwen2_moe)", "hybrid (qwen3_next)", "sliding window (gpt_oss)"])
def test_tokens_are_stocks_wherever_the_segments_end(models, name):
    path = models[name]
    prompt = np.random.default_rng(3).integers(1, 8000, size=24).tolist()
    ref = _stock(path, prompt)
    info = chronos_mlx.loader.plan_model(path).info
    n = info["moe_layers"]
    rng = random.Random(name)
    plans = {"every layer": range(n), "none": (), "random": rng.sample(range(n), max(1, n // 2)), "planned": None}
    for label, ends in plans.items():
        model, _, runtime = chronos_mlx.load(path, expert_budget=info["top_k"] / info["num_experts"])
        ids = [t for t, _ in generate_step(mx.array(prompt), model, runtime, max_tokens=TOKENS, segment_ends=ends)]
        assert ids == ref, f"segment ends {label}"
        stats = runtime.stats()
        if label == "none":
            assert stats["recomputes"] > 0  # the misses were real
        if label == "every layer":
            assert stats["recomputes"] == 0  # every layer was routed before it computed


def test_every_layer_an_end_is_used_while_it_measures_faster_than_the_plan():
    planner = SegmentPlanner(4, miss=np.zeros(4), explore_every=1000)
    assert planner.ends() == frozenset()  # nothing misses: the plan is one read after the step
    planner.observe_step(0.010, ends=0, recomputed_layers=2, recoveries=1)  # the plan, measured
    planner.observe_step(0.004, ends=4, recomputed_layers=0, recoveries=0)  # every layer, measured
    assert planner.ends() == frozenset(range(4))
    for _ in range(20):  # the plan gets cheaper (misses stopped)
        planner.observe_step(0.002, ends=0, recomputed_layers=0, recoveries=0)
    assert planner.ends() == frozenset()


def test_an_interval_holding_steps_of_two_kinds_is_no_sample_of_either():
    # An interval verifies the step before and launches the next: a per-layer step works
    # while launched, an optimistic one while verified. Switching kinds puts two steps'
    # work (or none) in one interval; counted, it made per-layer routing look twice as dear
    # as it is each time it was explored, and kept a plan that recomputed.
    planner = SegmentPlanner(4, miss=np.zeros(4), explore_every=1000)
    planner.ends()
    planner.observe_step(0.004, ends=4, recomputed_layers=0, recoveries=0, previous_ends=4)  # every layer
    planner.observe_step(0.010, ends=0, recomputed_layers=2, recoveries=1, previous_ends=0)  # the plan
    for _ in range(5):
        planner.observe_step(0.020, ends=4, recomputed_layers=2, recoveries=1, previous_ends=0)  # both
        planner.observe_step(0.0001, ends=0, recomputed_layers=0, recoveries=0, previous_ends=4)  # neither
    assert planner.ends() == frozenset(range(4))


def test_the_planner_explores_the_other_kind_two_steps_in_a_row():
    planner = SegmentPlanner(4, miss=np.full(4, 0.001), explore_every=4)
    every = frozenset(range(4))
    plan = planner.ends()
    assert plan != every
    chosen = [planner.ends() == every for _ in range(2, 12)]  # calls 2..11
    assert chosen == [False, False, True, True, False, False, True, True, False, False]


def test_a_fit_that_finds_host_reads_free_does_not_lock_in_per_layer_routing():
    # Samples that all have every layer an end cannot tell a host read's cost from the rest
    # of a step: the fit calls reads free and plans an end at every layer. Measured on the
    # 2-core box at a budget of 63/64 (almost nothing misses): the own loop then read back
    # every layer of every token forever, at 0.87x of stock. The planner still measures a
    # plan with fewer ends, soon, and takes it once it is the faster one.
    planner = SegmentPlanner(8, miss=np.full(8, 1e-3), replan_every=1)
    every = frozenset(range(8))
    planner.coefficients = lambda: np.array([0.02, 0.0, 2e-3, 0.0])  # base, sync (free!), layer, recovery
    for _ in range(30):
        planner.observe_step(0.020, ends=8, recomputed_layers=0, recoveries=0, previous_ends=8)
    assert plan_ends(planner.miss, *planner.coefficients()[1:]) == every  # what the fit alone would do
    chosen = [planner.ends() for _ in range(6)]
    fewer = [c for c in chosen if c != every]
    assert fewer, "the alternative was never tried"
    k = len(fewer[0])
    for _ in range(3):  # it measures faster
        planner.observe_step(0.016, ends=k, recomputed_layers=0, recoveries=0, previous_ends=k)
    assert sum(planner.ends() != every for _ in range(3)) >= 2


def test_a_clearly_slower_kind_is_re_measured_less_often():
    # Exploring costs the gap between the two kinds: on a GPU a per-layer step can take
    # twice an optimistic one, and re-measuring it every 16 steps cost ~1/8 of that.
    planner = SegmentPlanner(8, miss=np.full(8, 1e-3), explore_every=16)
    plan = planner.ends()
    assert plan != frozenset(range(8))
    planner.observe_step(0.020, ends=len(plan), recomputed_layers=0, recoveries=0, previous_ends=len(plan))
    planner.observe_step(0.040, ends=8, recomputed_layers=0, recoveries=0, previous_ends=8)
    per_layer = sum(len(planner.ends()) == 8 for _ in range(128))
    assert per_layer == 4  # two steps in a row every 64, not every 16


def test_a_kind_more_than_twice_as_slow_is_re_measured_rarely():
    # Whole-token optimism where it loses by far (every step recomputes, ~3x a per-layer step):
    # two such steps every 64 would cost ~7 % of decoding.
    planner = SegmentPlanner(8, miss=np.full(8, 0.7), explore_every=16)
    planner.coefficients = lambda: np.array([0.02, 1e-4, 2e-3, 2e-3])
    for kind, seconds, io in ((8, 0.020, 0.012), (0, 0.100, 0.004)):
        planner.observe_step(seconds, ends=kind, recomputed_layers=0 if kind else 8, recoveries=int(not kind),
                             previous_ends=kind, io_s=io)
    assert len(planner.ends()) == 8
    whole = sum(len(planner.ends()) == 0 for _ in range(512))
    assert whole == 4  # two steps in a row every 256


def test_a_prior_that_overestimates_misses_gives_way_within_a_few_steps():
    # Before anything is measured a layer is taken to miss as often as experts are absent
    # (3 % at budget 0.97), which plans many ends over 48 layers. Measured on the H200 at
    # 0.97 (0.1 misses a token): the own loop kept its first plan for 16 of 32 tokens. The
    # plan is now redone after 1, 2, 4, 8 and 16 steps, then every 16.
    planner = SegmentPlanner(48, miss=np.full(48, 0.03))
    sizes = [len(planner.ends())]
    for _ in range(8):
        planner.observe_misses(range(48), set())
        sizes.append(len(planner.ends()))
    assert sizes[-1] < sizes[0], sizes


def test_a_plan_is_judged_by_its_steps_without_misses_plus_its_expected_redo():
    # Right after a prefill the first steps miss far more than later ones (H200, 0.97: 70
    # recomputed layers a step, then none). A plan measured then must not lose to
    # per-layer routing for good: its clean steps and today's miss estimates decide.
    miss = np.zeros(48)
    miss[0] = 0.5  # layer 0 misses often: one end there, whatever the costs
    planner = SegmentPlanner(48, miss=miss)
    planner.coefficients = lambda: np.array([0.019, 6e-4, 4e-4, 2e-3])
    assert planner.ends() == {0}
    planner.observe_step(0.075, ends=1, recomputed_layers=70, recoveries=2, previous_ends=1)  # warm-up misses
    planner.observe_step(0.043, ends=48, recomputed_layers=0, recoveries=0, previous_ends=48)
    assert len(planner.ends()) == 48  # measured slower (with its misses): per layer for now
    planner.observe_step(0.021, ends=1, recomputed_layers=0, recoveries=0, previous_ends=1)  # a clean step
    chosen = [planner.ends() for _ in range(8)]
    assert chosen.count(frozenset({0})) >= 7, chosen


def _decode_with_loads(planner, every_s, every_io, whole_s, whole_io, steps=40):
    """Feed a planner steps whose costs depend only on their kind; returns its choices."""
    chosen, before = [], None
    for _ in range(steps):
        ends = planner.ends()
        chosen.append(ends)
        whole = len(ends) < planner.n_layers
        planner.observe_step(whole_s if whole else every_s, ends=len(ends), recomputed_layers=40 if whole else 0,
                             recoveries=int(whole), previous_ends=before, io_s=whole_io if whole else every_io)
        before = len(ends)
    return chosen


def test_where_every_layer_misses_whole_token_optimism_is_measured_with_its_loads():
    # At 0.5 on the GPU most layers miss: the cost model ends every layer, and per-layer
    # routing loads one layer at a time (46 ms of loads a token) where a recovery loads
    # every missed layer as one batch (12 ms). Only measuring shows that; the loads count.
    every = frozenset(range(48))
    planner = SegmentPlanner(48, miss=np.full(48, 0.7))
    planner.coefficients = lambda: np.array([0.02, 1e-4, 4e-4, 2e-3])
    chosen = _decode_with_loads(planner, every_s=0.030, every_io=0.046, whole_s=0.045, whole_io=0.012)
    assert chosen[0] == every and frozenset() in chosen[:6]  # measured soon
    assert chosen[-16:].count(frozenset()) >= 12, chosen  # 57 ms a step against 76
    slow = SegmentPlanner(48, miss=np.full(48, 0.7))
    slow.coefficients = planner.coefficients
    chosen = _decode_with_loads(slow, every_s=0.030, every_io=0.046, whole_s=0.045, whole_io=0.046)
    assert chosen[-16:].count(every) >= 12, chosen  # loads no cheaper: 76 against 91 ms


def test_where_loads_are_a_small_part_of_a_step_whole_token_optimism_is_never_tried():
    # A CPU with small experts: per-layer routing waits ~2.5 ms for loads in a ~20 ms step.
    # Batching them cannot win back a recomputed pass, and trying costs ~3 steps each time.
    planner = SegmentPlanner(48, miss=np.full(48, 0.7))
    planner.coefficients = lambda: np.array([0.02, 1e-4, 4e-4, 2e-3])
    chosen = _decode_with_loads(planner, every_s=0.020, every_io=0.0025, whole_s=0.060, whole_io=0.002, steps=300)
    assert all(c == frozenset(range(48)) for c in chosen)


def test_only_the_first_miss_of_a_segment_costs_a_redo():
    # One recovery loads every layer that missed and recomputes from the first of them.
    n, layer_s, recovery_s = 8, 1e-3, 2e-3
    assert expected_redo(np.ones(n), frozenset(), layer_s, recovery_s) == pytest.approx(2 * n * layer_s + recovery_s)
    miss = np.zeros(n)
    miss[[2, 5]] = 0.5  # first miss at 2 (p 0.5) or at 5 (p 0.25)
    want = 0.5 * ((2 * n - 2) * layer_s + recovery_s) + 0.25 * ((2 * n - 5) * layer_s + recovery_s)
    assert expected_redo(miss, frozenset(), layer_s, recovery_s) == pytest.approx(want)
    # an end at 4: the segment 0..4 redoes from 2 to 4; after it, from 5 to the next step
    want = 0.5 * (3 * layer_s + recovery_s) + 0.5 * ((2 * n - 5) * layer_s + recovery_s)
    assert expected_redo(miss, frozenset({4}), layer_s, recovery_s) == pytest.approx(want)


def test_the_chance_of_a_miss_after_the_last_end_decides_whether_the_next_step_waits():
    miss = np.zeros(8)
    miss[[1, 6]] = 0.5
    planner = SegmentPlanner(8, miss=miss)
    assert planner.tail_miss(frozenset()) == pytest.approx(0.75)  # layer 1 or layer 6
    assert planner.tail_miss(frozenset({3})) == pytest.approx(0.5)  # layer 1 is checked at the end
    assert planner.tail_miss(frozenset({7})) == 0.0
    assert SegmentPlanner(8, miss=np.full(8, 0.01)).tail_miss(frozenset()) < 0.1  # rare: pipelined


def test_a_step_verified_before_the_next_was_launched_is_not_a_clean_sample():
    # While misses are likely each step is verified before the next is launched: nothing
    # overlaps, so such a step says little about the plan once misses have become rare.
    planner = SegmentPlanner(8, miss=np.full(8, 0.5))
    planner.observe_step(0.030, ends=2, recomputed_layers=0, recoveries=0, previous_ends=2, serial=True)
    assert 2 not in planner._clean and planner._measured[2] == 0.030
    planner.observe_step(0.020, ends=2, recomputed_layers=0, recoveries=0, previous_ends=2)
    assert planner._clean[2] == 0.020


def test_expected_redo_is_the_planners_own_cost_less_its_round_trips():
    rng = np.random.default_rng(0)
    miss = rng.uniform(0, 0.2, 12)
    for sync in (1e-4, 1e-3, 1e-2):
        ends = plan_ends(miss, sync, 4e-4, 2e-3)
        others = [frozenset(), frozenset(range(12)), frozenset({3, 7, 11})]
        best = sync * len(ends) + expected_redo(miss, ends, 4e-4, 2e-3)
        for other in others:
            assert best <= sync * len(other) + expected_redo(miss, other, 4e-4, 2e-3) + 1e-12
    assert expected_redo(miss, frozenset(range(12)), 4e-4, 2e-3) == 0.0
