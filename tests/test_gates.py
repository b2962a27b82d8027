"""Per-layer routing through gates (gates.py, used by Runtime.route).

A gated MoE layer's experts are built before its router's choice is known (they read their
slots through a device table) and computed only after the host has read that choice at the
next layer, loaded what was missing and rewritten the table. These tests pin that contract
against stock mlx_lm's own SwitchGLU on the same weights. (On MLX's CPU backend per-layer
routing computes late rows instead, late_rows.py; these runtimes are set to gate.)
"""

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from conftest import demo_switch, switch_inputs


def _gated(budget):
    model, tok, runtime = chronos_mlx.load(None, expert_budget=budget)
    runtime.late_rows = False
    return model, tok, runtime


def _absent(runtime, layer, inds):
    return (runtime.cache.layers[layer].slot_of[np.array(inds).reshape(-1)] < 0).any()


def test_a_layer_is_gated_without_a_host_read_and_exact_once_its_gate_opens(stock_demo):
    model, _, runtime = _gated(0.25)
    x, inds = switch_inputs(0)
    assert _absent(runtime, 3, inds)  # it needs loads
    syncs = runtime.layer_syncs
    y = demo_switch(model, 3)(x, inds)
    assert runtime.gated(3) and runtime.layer_syncs == syncs  # nothing read back yet
    runtime.open_gate()
    assert not runtime.gated(3) and runtime.layer_syncs == syncs + 1
    assert not _absent(runtime, 3, inds)
    np.testing.assert_array_equal(np.array(y), np.array(demo_switch(stock_demo, 3)(x, inds)))


def test_the_next_layer_opens_the_previous_gate_before_anything_reads_it(stock_demo):
    model, _, runtime = _gated(0.25)
    (x3, i3), (x4, i4) = switch_inputs(1), switch_inputs(2)
    y3 = demo_switch(model, 3)(x3, i3)
    y4 = demo_switch(model, 4)(x4, i4)  # routing layer 4 decides layer 3 first
    assert not runtime.gated(3) and runtime.gated(4)
    runtime.open_gate()
    np.testing.assert_array_equal(np.array(y3), np.array(demo_switch(stock_demo, 3)(x3, i3)))
    np.testing.assert_array_equal(np.array(y4), np.array(demo_switch(stock_demo, 4)(x4, i4)))


def test_an_outside_caller_never_sees_a_gate_left_open_after_a_forward_pass(demo_prompt_ids):
    """mlx_lm's own loop evaluates the logits itself: the last MoE layer is routed on the spot."""
    from mlx_lm.models.cache import make_prompt_cache

    model, _, runtime = _gated(0.25)
    cache = make_prompt_cache(model)
    for token in demo_prompt_ids[:4]:
        model(mx.array([[token]]), cache=cache)
        assert runtime.gate is None


def test_a_caller_that_defers_the_last_layer_opens_its_gate_itself(demo_prompt_ids):
    from mlx_lm.models.cache import make_prompt_cache

    model, _, runtime = _gated(0.25)
    runtime.defer_last = True
    logits = model(mx.array([demo_prompt_ids[:1]]), cache=make_prompt_cache(model))
    assert runtime.gated(runtime.last_moe_layer)
    runtime.open_gate()
    assert runtime.gate is None
    mx.eval(logits)


def test_a_batch_larger_than_the_slots_is_routed_on_the_spot_not_gated():
    model, _, runtime = _gated(0.125)  # 8 slots
    x, inds = switch_inputs(3, n_tokens=4)  # up to 32 distinct experts
    y = demo_switch(model, 2)(x, inds)
    assert not runtime.gated(2)
    mx.eval(y)


def test_unpipelined_per_layer_routing_stops_at_each_layer_and_gives_the_same_output(stock_demo):
    model, _, runtime = _gated(0.25)
    runtime.pipelined = False
    x, inds = switch_inputs(4)
    syncs = runtime.layer_syncs
    y = demo_switch(model, 5)(x, inds)
    assert not runtime.gated(5) and runtime.layer_syncs == syncs + 1
    np.testing.assert_array_equal(np.array(y), np.array(demo_switch(stock_demo, 5)(x, inds)))


def test_the_gate_table_is_rewritten_only_after_its_layer_changed():
    _, _, runtime = _gated(0.25)
    cache = runtime.cache
    L = cache.layers[1]
    cache.ensure(1, [0, 1, 2])
    cache.write_gate_table(1)
    assert not L.gate_stale
    assert [int(v) for v in np.array(L.gate_table)[[0, 1, 2]]] == L.slot_of[[0, 1, 2]].tolist()
    cache.ensure(1, [0, 1, 2])  # resident already: no change
    assert not L.gate_stale
    cache.ensure(1, [40])
    assert L.gate_stale
