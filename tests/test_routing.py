"""routing: a MoE layer's expert ids become slot ids that hold those experts, with as few host
reads as exactness allows, and demand loads are counted as what they cost."""

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx.routing import account_step, load_for, route
from chronos_mlx.verification import SegmentMiss, StepRecord


@pytest.fixture()
def runtime():
    _, _, rt = chronos_mlx.load(None, expert_budget=0.25)  # 16 slots of 64 per layer
    rt.pipelined = False  # routed on the spot (gates have their own tests)
    return rt


def _absent(rt, layer, n):
    return [int(e) for e in np.flatnonzero(rt.cache.layers[layer].slot_of < 0)[:n]]


def test_per_layer_routing_loads_what_is_missing_and_maps_ids_to_the_slots_holding_them(runtime):
    layer = 2
    runtime.cache.ensure(layer, [0])
    want = [7, 9, 40, 0]  # three absent, one resident
    ids = mx.array([want], dtype=mx.uint32)
    syncs = runtime.layer_syncs
    slots = np.array(route(runtime, layer, ids)).reshape(-1)
    L = runtime.cache.layers[layer]
    assert [int(L.expert_in[s]) for s in slots] == want  # each slot holds the expert asked for
    assert runtime.layer_syncs == syncs + 1  # one host read of the ids
    assert L.counters.misses == 3 and L.counters.hits == 1


def test_a_layer_with_every_expert_resident_is_routed_without_a_host_read():
    _, _, rt = chronos_mlx.load(None, expert_budget=1.0)
    ids = mx.array([[5, 9, 63]], dtype=mx.uint32)
    slots = np.array(route(rt, 0, ids)).reshape(-1)
    L = rt.cache.layers[0]
    assert [int(L.expert_in[s]) for s in slots] == [5, 9, 63]
    assert rt.layer_syncs == 0


def test_more_experts_than_slots_go_to_waves_or_stop_a_speculative_pass(runtime):
    many = mx.array([list(range(40))], dtype=mx.uint32)  # 40 distinct experts, 16 slots
    assert route(runtime, 1, many) is None  # per layer: the module streams them in waves
    with runtime.recording(ends={1}):
        with pytest.raises(SegmentMiss) as miss:
            route(runtime, 1, many)  # a segment end: only per-layer routing can compute it
    assert miss.value.first == 1


def test_optimistic_routing_records_ids_between_segment_ends_without_reading_them(runtime):
    ids = mx.array([_absent(runtime, 3, 2)], dtype=mx.uint32)
    with runtime.recording(ends=frozenset()) as rec:
        route(runtime, 3, ids)
    assert rec.layers == [3] and runtime.layer_syncs == 0
    assert runtime.cache.layers[3].counters.misses == 0  # nothing loaded: the step will be checked


def test_a_demand_load_is_a_stall_only_when_something_was_absent(runtime):
    layer = 4
    runtime.cache.ensure(layer, [0, 1])
    resident = [0, 1]
    assert load_for(runtime, layer, resident) == []
    assert runtime.counters.io_wait_s == 0.0
    absent = _absent(runtime, layer, 2)
    assert sorted(load_for(runtime, layer, absent)) == absent
    assert runtime.counters.io_wait_s > 0.0


def test_a_verified_step_counts_hits_except_for_what_was_loaded_for_it(runtime):
    rec = StepRecord()
    pairs = [(0, np.array([1, 2, 2, 3])), (1, np.array([4, 5]))]
    account_step(runtime, rec, pairs, loaded={0: {3}})
    assert runtime.cache.layers[0].counters.hits == 3  # 1, 2, 2; 3 was a miss loaded for it
    assert runtime.cache.layers[1].counters.hits == 2
    account_step(runtime, rec, [(2, np.array([7]))], before=2)  # from the first miss on: not kept
    assert runtime.cache.layers[2].counters.hits == 0
