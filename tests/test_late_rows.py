"""Per-layer routing with late rows (late_rows.py, the per-layer form on MLX's CPU backend).

A MoE layer's experts are computed at once on the slot map of the moment; the host reads the
router's ids while they compute, loads the missing experts and recomputes only the rows whose
expert the map lacked. These tests pin that contract against stock mlx_lm's own SwitchGLU on
the same weights, and stock mlx_lm's decoding.
"""

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx import late_rows
from chronos_mlx.generate import generate_step
from conftest import DEMO, demo_switch, stock_greedy, switch_inputs


def _rows_runtime(budget):
    model, _, runtime = chronos_mlx.load(None, expert_budget=budget)
    runtime.late_rows = True  # the default on the CPU backend; set for other backends too
    return model, runtime


def _count_recomputed_rows(monkeypatch, switch):
    counted = []
    real = type(switch)._padded_experts

    def spy(self, x_rows, idx, total_rows):
        counted.append(len(idx))
        return real(self, x_rows, idx, total_rows)

    monkeypatch.setattr(type(switch), "_padded_experts", spy)
    return counted


def test_the_cpu_backend_routes_per_layer_with_late_rows():
    _, _, runtime = chronos_mlx.load(None, expert_budget=0.5)
    assert runtime.late_rows == (mx.default_device() == mx.cpu)


def test_a_layer_with_missing_experts_is_exact_and_recomputes_only_their_rows(stock_demo, monkeypatch):
    model, runtime = _rows_runtime(0.25)
    x, inds = switch_inputs(0)
    ids = np.array(inds).reshape(-1)
    runtime.cache.ensure(3, ids[:5].tolist())  # five of the eight resident, three missing
    counted = _count_recomputed_rows(monkeypatch, demo_switch(model, 3))
    syncs = runtime.layer_syncs
    y = demo_switch(model, 3)(x, inds)
    assert runtime.layer_syncs == syncs + 1 and runtime.gate is None  # read at once, never gated
    assert counted == [3]
    assert (runtime.cache.layers[3].slot_of[ids] >= 0).all()
    np.testing.assert_array_equal(np.array(y), np.array(demo_switch(stock_demo, 3)(x, inds)))


def test_a_layer_whose_experts_are_all_resident_recomputes_nothing(stock_demo, monkeypatch):
    model, runtime = _rows_runtime(0.25)
    x, inds = switch_inputs(1)
    runtime.cache.ensure(2, np.array(inds).reshape(-1).tolist())
    counted = _count_recomputed_rows(monkeypatch, demo_switch(model, 2))
    y = demo_switch(model, 2)(x, inds)
    assert counted == []
    np.testing.assert_array_equal(np.array(y), np.array(demo_switch(stock_demo, 2)(x, inds)))


def test_garbage_rows_never_reach_the_output(stock_demo):
    # Nothing resident: every row is first computed from a free slot, here full of NaN
    # scales. Each is recomputed after the loads; none is combined with anything.
    model, runtime = _rows_runtime(0.25)
    L = runtime.cache.layers[4]
    assert (L.slot_of < 0).all()
    for name, p in L.params.items():
        if name.endswith("scales"):
            p.view[:] = np.nan
    x, inds = switch_inputs(2)
    y = np.array(demo_switch(model, 4)(x, inds))
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y, np.array(demo_switch(stock_demo, 4)(x, inds)))


def test_an_expert_that_landed_after_the_layer_took_its_map_is_still_recomputed(stock_demo):
    # A prefetch may map an expert between the map the rows were computed with and the host's
    # read of the ids: its row was computed from another slot and must be recomputed anyway.
    model, runtime = _rows_runtime(0.25)
    L = runtime.cache.layers[5]
    x, inds = switch_inputs(3)
    ids = np.array(inds).reshape(-1).tolist()
    runtime.cache.ensure(5, ids[:4])
    L.refresh()  # the map the layer will compute with: ids[4:] absent ...
    runtime.cache.ensure(5, ids[4:])  # ... then they land, after the snapshot, as a prefetch would
    L.dirty = False  # (the layer's snapshot stays the one taken above)
    y = demo_switch(model, 5)(x, inds)
    np.testing.assert_array_equal(np.array(y), np.array(demo_switch(stock_demo, 5)(x, inds)))


def test_prefill_sized_calls_and_resident_layers_take_the_other_paths():
    model, runtime = _rows_runtime(0.125)  # 8 slots
    x, inds = switch_inputs(4, n_tokens=4)  # 32 rows, more than the slots: waves
    assert not late_rows.applies(runtime, 2, inds)
    _, full = _rows_runtime(1.0)
    assert not late_rows.applies(full, 2, switch_inputs(5)[1])  # nothing can miss: no host read
    runtime.mode = "optimistic"
    assert not late_rows.applies(runtime, 2, switch_inputs(6)[1])  # optimistic steps record instead


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.125])
def test_per_layer_decoding_with_late_rows_gives_stock_tokens(budget, demo_prompt_ids):
    ref, ref_lp = stock_greedy(DEMO, demo_prompt_ids, 12)
    model, runtime = _rows_runtime(budget)
    got = list(generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=12, sync="per-layer"))
    assert [t for t, _ in got] == ref
    for (_, lp), want in zip(got, ref_lp):
        np.testing.assert_array_equal(np.array(lp), want)
    assert runtime.cache_totals()["misses"] > 0  # it loaded on the way
    assert runtime.gate is None


def test_inline_guesses_land_before_the_next_layer_takes_its_map(demo_prompt_ids, monkeypatch):
    # With inline reads, a layer reads the predictor's guesses for the next layer while its own
    # rows compute: they are in the next layer's map, so that layer recomputes only the rows of
    # experts it had to load itself (a guess read later would cost a recomputed row anyway).
    from chronos_mlx.predict_runtime import attach_predictor

    ref, _ = stock_greedy(DEMO, demo_prompt_ids, 10)
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.25, io_threads=0)
    runtime.late_rows = True
    attach_predictor(model, runtime, "gate")
    recomputed, per_call = [], []
    real_pad = type(demo_switch(model, 0))._padded_experts
    monkeypatch.setattr(type(demo_switch(model, 0)), "_padded_experts",
                        lambda self, x, idx, total: (recomputed.append(len(idx)), real_pad(self, x, idx, total))[1])
    real_compute = late_rows.compute

    def compute(rt, switch, layer, x, indices):
        before, rows = rt.cache.layers[layer].counters.misses, len(recomputed)
        y = real_compute(rt, switch, layer, x, indices)
        per_call.append((sum(recomputed[rows:]), rt.cache.layers[layer].counters.misses - before))
        return y

    monkeypatch.setattr(late_rows, "compute", compute)
    got = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=10, sync="per-layer")]
    assert got == ref
    assert runtime.stats()["prefetch_hits"] > 0
    assert per_call and all(rows == loaded for rows, loaded in per_call)  # one token a step: a row an expert


def test_recomputed_rows_are_counted_in_the_stats(demo_prompt_ids):
    model, runtime = _rows_runtime(0.25)
    list(generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=6, sync="per-layer"))
    s = runtime.stats()
    assert 0 < s["recomputed_rows"] <= s["misses"]  # one token a step: at most a row a loaded expert
