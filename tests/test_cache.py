"""ExpertCache: slots hold exactly the shard bytes, eviction respects the policy and what is
in use, prefetches never block demand, and a half-written slot is never mapped."""

import threading
import time

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx.io import SimulatedSSD

from conftest import DEMO


@pytest.fixture()
def runtime():
    _, _, rt = chronos_mlx.load(None, expert_budget=0.25)  # 16 slots per layer
    return rt


def _slot_bytes(cache, layer, expert):
    L = cache.layers[layer]
    p = L.params["up_proj.weight"]
    return np.array(p.view[L.slot_of[expert]])


def test_a_loaded_slot_holds_the_experts_bytes_from_the_shard(runtime):
    cache = runtime.cache
    cache.ensure(2, [5, 40])
    truth = np.array(mx.load(str(DEMO / "model.safetensors"))["model.layers.2.mlp.switch_mlp.up_proj.weight"])
    assert np.array_equal(_slot_bytes(cache, 2, 40), truth[40])
    assert np.array_equal(_slot_bytes(cache, 2, 5), truth[5])


def test_a_layers_missing_experts_are_read_as_one_batch_and_neighbours_share_reads(runtime):
    cache = runtime.cache
    before = cache.reader.read_calls
    cache.ensure(2, [20, 21, 22])  # adjacent in the stacked tensors
    params = len(cache.layers[2].params)
    assert cache.reader.read_calls - before == params  # one read per parameter, not per expert
    truth = np.array(mx.load(str(DEMO / "model.safetensors"))["model.layers.2.mlp.switch_mlp.up_proj.weight"])
    for e in (20, 21, 22):
        assert np.array_equal(_slot_bytes(cache, 2, e), truth[e])


def test_converted_parameters_equal_stock_after_a_batch_read(runtime):
    cache = runtime.cache
    cache.ensure(6, [1, 2, 30])
    stock = mx.load(str(DEMO / "model.safetensors"))["model.layers.6.mlp.switch_mlp.gate_proj.scales"]
    L = cache.layers[6]
    p = L.params["gate_proj.scales"]  # bfloat16 on disk, float32 resident
    for e in (1, 2, 30):
        assert np.array_equal(p.view[L.slot_of[e]], np.array(stock[e].astype(mx.float32)))


def test_slots_reused_by_small_demand_loads_hold_every_parameter_exactly(runtime):
    # Decode-sized loads (a few experts, most not neighbours on disk) go through the lean
    # path: bf16 scales reach float32 slots by writing only their upper halves, which is
    # exact only while nothing else is ever left in the lower ones. Cycle far more experts
    # through the 16 slots than fit, then compare every parameter with stock's values.
    cache = runtime.cache
    L = cache.layers[5]
    rng = np.random.default_rng(3)
    for _ in range(40):
        wanted = rng.choice(64, int(rng.integers(1, 5)), replace=False)
        cache.ensure(5, wanted)
        cache.mark_used(5, wanted)
    stock = mx.load(str(DEMO / "model.safetensors"))
    for name, p in L.params.items():
        truth = stock[f"model.layers.5.mlp.switch_mlp.{name}"]
        for e in np.flatnonzero(L.slot_of >= 0):
            want = np.array(truth[int(e)].astype(p.slots.dtype))
            assert np.array_equal(p.view[L.slot_of[e]], want.view(p.view.dtype)), (name, e)
    assert L.counters.evictions > 20


def test_a_prefetch_read_beside_a_demand_read_of_the_same_layer_never_mixes_their_bytes(runtime):
    # A prefetch's reads (pool or planner thread) may run while the main thread loads other
    # experts of the same layer into other slots: converted parameters are staged, and each
    # thread must stage into its own rows.
    cache = runtime.cache
    L = cache.layers[4]
    p = L.params["gate_proj.scales"]  # bf16 on disk, float32 in the slots: staged
    truth = mx.load(str(DEMO / "model.safetensors"))["model.layers.4.mlp.switch_mlp.gate_proj.scales"]
    want = {e: np.array(truth[e].astype(mx.float32)) for e in range(8)}
    bad, stop = [], threading.Event()

    def other_thread():
        while not stop.is_set():
            cache._read_small(L, [(0, 0), (1, 1), (2, 2), (3, 3)])
            bad.extend(s for s, e in enumerate(range(4)) if not np.array_equal(p.view[s], want[e]))

    t = threading.Thread(target=other_thread)
    t.start()
    try:
        for _ in range(300):
            cache._read_small(L, [(4, 4), (5, 5), (6, 6), (7, 7)])
            bad.extend(s for s in range(4, 8) if not np.array_equal(p.view[s], want[s]))
    finally:
        stop.set()
        t.join()
    assert not bad


def test_short_reads_are_finished_not_mistaken_for_the_end_of_the_file(runtime, monkeypatch):
    # preadv may return fewer bytes than asked (a signal, a network file system): the
    # demand path finishes the read instead of failing or leaving a slot half written.
    import os

    real = os.preadv

    def half(fd, buffers, offset):
        first = memoryview(buffers[0]).cast("B")
        return real(fd, [first[: max(1, len(first) // 2)]], offset)

    monkeypatch.setattr(os, "preadv", half)
    cache = runtime.cache
    cache.ensure(3, [7, 8])  # neighbours on disk: one vectored read per tensor
    cache.ensure(3, [20, 40])  # apart: one read per tensor per expert
    monkeypatch.setattr(os, "preadv", real)
    L = cache.layers[3]
    stock = mx.load(str(DEMO / "model.safetensors"))
    for name, p in L.params.items():
        truth = stock[f"model.layers.3.mlp.switch_mlp.{name}"]
        for e in (7, 8, 20, 40):
            want = np.array(truth[e].astype(p.slots.dtype))
            assert np.array_equal(p.view[L.slot_of[e]], want.view(p.view.dtype)), (name, e)


def _stock_params(layer):
    stock = mx.load(str(DEMO / "model.safetensors"))
    prefix = f"model.layers.{layer}.mlp.switch_mlp."
    return {k[len(prefix):]: v for k, v in stock.items() if k.startswith(prefix)}


def _assert_resident_equal_stock(cache, layer, experts):
    L = cache.layers[layer]
    for name, truth in _stock_params(layer).items():
        p = L.params[name]
        for e in experts:
            want = np.array(truth[int(e)].astype(p.slots.dtype))
            assert np.array_equal(p.view[L.slot_of[e]], want.view(p.view.dtype)), (layer, name, e)


def test_several_layers_missing_experts_are_read_as_one_submission(runtime, monkeypatch):
    # A recovery reloads every layer that missed: one reader submission shares all their
    # reads among the reader threads (layer by layer, a layer's few experts leave most idle).
    cache = runtime.cache
    cache.reader.min_bytes_per_thread = 1  # too small to be read by one thread alone
    submissions = []
    real = cache.reader.read_runs
    monkeypatch.setattr(cache.reader, "read_runs", lambda runs, **kw: submissions.append(len(runs)) or real(runs, **kw))
    cache.ensure(3, [4])
    wanted = {1: [3, 9, 10], 3: [4, 50], 6: [63]}
    loaded = cache.ensure_layers(wanted)
    assert {l: sorted(e) for l, e in loaded.items()} == {1: [3, 9, 10], 3: [50], 6: [63]}
    assert len(submissions) == 2  # the first `ensure`, then one for all three layers
    for layer, experts in wanted.items():
        _assert_resident_equal_stock(cache, layer, experts)
        cache.layers[layer].refresh()
        assert (cache.layers[layer].table_map[experts] >= 0).all()


def test_loading_layers_together_evicts_what_loading_them_one_by_one_would(runtime):
    _, _, other = chronos_mlx.load(None, expert_budget=0.25)
    for rt in (runtime, other):
        rt.cache.reader.min_bytes_per_thread = 1
        rng = np.random.default_rng(0)
        for _ in range(6):  # a usage history: the policy's victims differ from free-slot order
            for layer in (0, 2):
                used = rng.choice(64, 8, replace=False)
                rt.cache.ensure(layer, used)
                rt.cache.mark_used(layer, used)
    wanted = {0: [1, 2, 3, 60], 2: [5, 6, 61, 62, 63]}
    runtime.cache.ensure_layers(wanted)
    for layer, experts in wanted.items():
        other.cache.ensure(layer, experts)
    for layer in wanted:
        assert np.array_equal(runtime.cache.layers[layer].slot_of, other.cache.layers[layer].slot_of)
    _assert_resident_equal_stock(runtime.cache, 2, wanted[2])


def test_a_failed_read_of_several_layers_leaves_no_slot_claimed(runtime, monkeypatch):
    cache = runtime.cache
    cache.reader.min_bytes_per_thread = 1

    def broken(runs, **kw):
        raise chronos_mlx.ShardError("read failed")

    monkeypatch.setattr(cache.reader, "read_runs", broken)
    with pytest.raises(chronos_mlx.ShardError):
        cache.ensure_layers({1: [3, 4], 2: [7]})
    for layer in (1, 2):
        L = cache.layers[layer]
        assert not (L.expert_in == -2).any()
        assert (L.slot_of < 0).all()
    monkeypatch.undo()
    assert sorted(cache.ensure_layers({1: [3, 4]})[1]) == [3, 4]


def test_a_layer_whose_expert_a_prefetch_is_reading_waits_for_it_instead(runtime):
    cache = runtime.cache
    cache.reader.simulator = SimulatedSSD(bandwidth=100e6, latency=1e-3)
    cache.prefetch(3, [7], limit=1)
    before = cache.layers[3].counters.bytes_read
    loaded = cache.ensure_layers({3: [7, 8], 4: [1]})
    assert loaded[4] == [1] and 8 in loaded[3]
    # 7 arrived through the prefetch, read once
    assert cache.layers[3].counters.bytes_read == before + 2 * cache.bytes_on_disk_per_expert


def test_lru_evicts_the_least_recently_used_and_never_what_is_requested(runtime):
    cache = runtime.cache
    cache.ensure(0, list(range(16)))  # full (loaded in parallel: their order is arbitrary)
    for e in range(16):
        cache.mark_used(0, [e])  # used in the order 0, 1, ..., 15
    cache.mark_used(0, [0, 1])  # 0 and 1 become most recent
    loaded = cache.ensure(0, [0, 20])
    assert loaded == [20]
    L = cache.layers[0]
    assert L.slot_of[2] < 0  # the oldest untouched one went
    assert L.slot_of[0] >= 0 and L.slot_of[1] >= 0


def test_too_many_experts_for_the_slots_is_refused(runtime):
    with pytest.raises(ValueError, match="17 experts requested, 16 slots"):
        runtime.cache.ensure(0, list(range(17)))


def test_demand_loads_get_slots_even_when_prefetches_hold_all_free_ones(runtime):
    cache = runtime.cache
    cache.reader.simulator = SimulatedSSD(bandwidth=50e6, latency=2e-3)  # slow: prefetches stay in flight
    started = cache.prefetch(1, list(range(16)), limit=16)
    assert started == 16
    loaded = cache.ensure(1, [60, 61, 62])
    assert sorted(loaded) == [60, 61, 62]
    assert (cache.layers[1].slot_of[[60, 61, 62]] >= 0).all()


def test_a_prefetched_expert_is_waited_for_not_read_twice(runtime):
    cache = runtime.cache
    cache.reader.simulator = SimulatedSSD(bandwidth=100e6, latency=1e-3)
    cache.prefetch(3, [7], limit=1)
    before = cache.layers[3].counters.bytes_read
    cache.ensure(3, [7])
    assert cache.layers[3].counters.bytes_read == before + cache.bytes_on_disk_per_expert
    cache.mark_used(3, [7])
    assert cache.layers[3].counters.prefetch_hits == 1


def test_waiting_for_a_prefetch_in_flight_counts_as_a_stall_though_nothing_is_loaded(runtime):
    # What a prediction costs on the critical path must show in the stall: a demand that
    # waits for a prefetch still reading loads nothing itself, yet the decode step waits.
    runtime.cache.reader.simulator = SimulatedSSD(bandwidth=10e6, latency=20e-3)
    runtime.cache.prefetch(3, [7], limit=1)
    assert runtime.load_for(3, [7]) == []
    assert runtime.counters.io_wait_s >= 0.01


def test_a_slot_being_written_is_not_visible_in_the_table(runtime):
    cache = runtime.cache
    cache.reader.simulator = SimulatedSSD(bandwidth=1e6, latency=0.2)  # 0.2 s and more per read
    L = cache.layers[4]
    cache.prefetch(4, [9], limit=1)
    time.sleep(0.05)
    L.refresh()
    assert L.table_map[9] < 0  # still in flight: compute would treat it as absent
    cache.ensure(4, [9])
    L.refresh()
    assert L.table_map[9] >= 0


def test_prewarm_fills_free_slots_from_a_background_thread_without_evicting(runtime):
    cache = runtime.cache
    cache.ensure(5, [1, 2])
    t = threading.Thread(target=cache.prewarm, args=({5: list(range(10, 40))},))
    t.start()
    t.join()
    L = cache.layers[5]
    assert L.slot_of[1] >= 0 and L.slot_of[2] >= 0
    assert int((L.slot_of >= 0).sum()) == 16


@pytest.mark.parametrize("bits", [None, 4])
def test_a_float16_checkpoint_run_at_float32_gets_converted_values_from_small_loads(tmp_path, demo_prompt_ids, bits):
    # Small decode loads take the lean path, which converts only bf16 to float32; a float16
    # checkpoint computed at float32 (float16 weights, or 4-bit with float16 scales and
    # biases, as many mlx-community conversions have) must be converted by the general
    # path (it once got the raw float16 bytes in its float32 slots), and decode exactly
    # like stock.
    import glob

    from synthetic import write_synthetic_moe

    from conftest import stock_greedy

    path = write_synthetic_moe(tmp_path / "f16", "qwen3_moe", bits=bits, dtype="float16")
    model, _, rt = chronos_mlx.load(str(path), expert_budget=0.5, dtype="float32")
    rt.cache.ensure(0, [1, 3])  # two experts: a small, lean-sized load
    stock = {}
    for f in glob.glob(str(path / "*.safetensors")):
        stock.update(mx.load(f))
    L = rt.cache.layers[0]
    for name, p in L.params.items():
        want = stock[f"model.layers.0.mlp.switch_mlp.{name}"]
        for e in (1, 3):
            assert np.array_equal(p.view[L.slot_of[e]], np.array(want[e].astype(p.slots.dtype)).view(p.view.dtype)), name
    prompt = list(demo_prompt_ids)
    ids, _ = stock_greedy(path, prompt, 6)
    from chronos_mlx.generate import generate_step

    got = [t for t, _ in generate_step(mx.array(prompt), model, rt, max_tokens=6)]
    assert got == ids


def test_a_demand_load_waits_for_a_prewarm_that_holds_every_slot(runtime):
    # A profile's pre-warm reserves free slots from its own thread; a decode step that
    # finds every slot reserved by it must wait for those reads to land (then evict),
    # not give up after spinning through its retries (it once did, in CI).
    cache = runtime.cache
    cache.reader.simulator = SimulatedSSD(bandwidth=1e6, latency=0.3)
    L = cache.layers[5]
    t = threading.Thread(target=cache.prewarm, args=({5: list(range(L.num_slots))},))
    t.start()
    time.sleep(0.05)
    assert int((L.expert_in == -2).sum()) == L.num_slots  # every slot is being filled
    want = list(range(L.num_experts - 8, L.num_experts))
    cache.ensure(5, want)
    t.join()
    L.refresh()
    assert all(L.slot_of[e] >= 0 for e in want)
