"""Device-fetch routing (device_fetch.py): each MoE layer's kernel fetches its own misses from
the shards, with no host thread while steps run.

On a machine without CUDA the kernel's decisions and copies are made by the host stand-in
(`fetch_kernels.host_fetch`) over the same device arrays, from the shard files mapped as the
CUDA path maps them (unregistered); the decode loop, the accounting and the hand-back of the
slots to the host's cache are the shipped ones. Tokens are compared with stock mlx_lm's.
"""

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx import device_fetch, device_wait, wait_kernels
from chronos_mlx.device_fetch import DeviceFetcher, RegisteredShards
from chronos_mlx.errors import ChronosError, DeviceWaitError
from chronos_mlx.fetch_kernels import host_fetch
from chronos_mlx.generate import generate_step
from conftest import DEMO, assert_stock, stock_greedy

MAX_TOKENS = 12
cuda = pytest.mark.skipif(not wait_kernels.available(), reason="needs MLX's CUDA backend")


@pytest.fixture(scope="module")
def reference(demo_prompt_ids):
    return stock_greedy(DEMO, demo_prompt_ids, MAX_TOKENS)


@pytest.fixture
def fetching(monkeypatch):
    """make(path, budget) -> (model, runtime) with a stand-in fetcher (closed after the test)."""
    if wait_kernels.available():
        pytest.skip("on CUDA the kernel itself is tested instead of the host stand-in")
    monkeypatch.setattr(device_wait, "available", lambda: True)
    made = []

    def make(path, budget, **kw):
        model, _, runtime = chronos_mlx.load(path, expert_budget=budget, **kw)
        runtime.waiter = DeviceFetcher(runtime, kernel=host_fetch)
        made.append(runtime.waiter)
        return model, runtime

    yield make
    for fetcher in made:
        fetcher.close()


def _decode(runtime, model, prompt_ids, sync="device-fetch", max_tokens=MAX_TOKENS):
    out = list(generate_step(mx.array(prompt_ids), model, runtime, max_tokens=max_tokens, sync=sync))
    return [int(t) for t, _ in out], [lp for _, lp in out]


@pytest.mark.parametrize("budget", [0.5, 0.125])  # 0.125: one token's experts, nearly every layer misses
def test_layers_that_fetch_their_own_experts_give_stock_tokens(budget, reference, demo_f32, demo_prompt_ids, fetching):
    model, runtime = fetching(demo_f32, budget)
    assert_stock(_decode(runtime, model, demo_prompt_ids), reference)
    stats = runtime.stats()
    assert stats["decode_misses"] > 0
    assert stats["decode_bytes_read"] == stats["decode_misses"] * runtime.cache.bytes_on_disk_per_expert
    assert stats["device_waits"] == 0  # no host thread answered anything
    # One read of the step's routing (and one of its token) a step, never one a layer.
    assert stats["host_syncs_per_token"] <= 2.5


@pytest.mark.parametrize("budget", [0.5, 0.125])
def test_guesses_for_the_next_layer_are_prefetched_on_the_device_and_tokens_stay_stock(budget, reference, demo_f32,
                                                                                      demo_prompt_ids, fetching):
    """With a predictor (the next layer's router on this layer's input), each layer's fetch is
    followed by a prefetch of the next layer's guesses; the next layer's fetch then finds
    them resident. Tokens stay stock's; fewer of a layer's experts miss; every byte copied
    is counted."""
    from chronos_mlx.predict_runtime import attach_predictor

    model, runtime = fetching(demo_f32, budget)
    _decode(runtime, model, demo_prompt_ids)
    without = runtime.stats()["decode_misses"]
    model, runtime = fetching(demo_f32, budget)
    attach_predictor(model, runtime, "gate")
    assert_stock(_decode(runtime, model, demo_prompt_ids), reference)
    stats = runtime.stats()
    assert stats["decode_prefetch_hits"] > 0
    assert stats["decode_misses"] < without
    per_expert = runtime.cache.bytes_on_disk_per_expert
    assert stats["decode_bytes_read"] > stats["decode_misses"] * per_expert  # the prefetches' bytes too
    assert stats["decode_bytes_read"] % per_expert == 0


def test_after_a_generation_the_hosts_cache_holds_what_the_device_left(demo_f32, demo_prompt_ids, fetching):
    """Every expert the host now maps is in its slot, byte for byte as in the shard."""
    from chronos_mlx.cache import _numpy_view

    model, runtime = fetching(demo_f32, 0.25)
    _decode(runtime, model, demo_prompt_ids)
    with open(next(demo_f32.glob("*.safetensors")), "rb") as f:
        data = f.read()
    for L in runtime.cache.layers:
        resident = np.flatnonzero(L.slot_of >= 0)
        assert len(resident) == L.num_slots  # the decode filled every slot
        assert sorted(L.slot_of[resident].tolist()) == list(range(L.num_slots))
        for e in resident.tolist():
            slot = int(L.slot_of[e])
            assert L.expert_in[slot] == e
            for p in L.params.values():
                assert _numpy_view(p.slots)[slot].tobytes() == data[p.offsets[e] : p.offsets[e] + p.source.nbytes]


def test_generations_after_it_in_any_mode_start_from_its_cache_and_give_stock_tokens(reference, demo_f32,
                                                                                      demo_prompt_ids, fetching):
    model, runtime = fetching(demo_f32, 0.25)
    for sync in ("device-fetch", "device-fetch", "per-layer", "optimistic", "device-fetch"):
        assert _decode(runtime, model, demo_prompt_ids, sync=sync)[0] == reference[0], sync


def test_every_use_is_counted_once_as_a_hit_or_a_miss(demo_f32, demo_prompt_ids, fetching):
    model, runtime = fetching(demo_f32, 0.25)
    _decode(runtime, model, demo_prompt_ids)
    stats = runtime.stats()
    top_k, n_layers = runtime.info["top_k"], len(runtime.cache.layers)
    decode_steps = stats["generated_tokens"] - 1  # the first token comes from prefill
    assert stats["hits"] + stats["misses"] >= decode_steps * top_k * n_layers
    assert 0 < stats["decode_hit_rate"] < 1


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    from synthetic import write_synthetic_moe

    root = tmp_path_factory.mktemp("fetching")
    return {
        "shared expert (qwen2_moe)": write_synthetic_moe(root / "qwen2_moe", "qwen2_moe", bits=4, seed=6),
        "hybrid (qwen3_next)": write_synthetic_moe(root / "qwen3_next", "qwen3_next", bits=4, seed=7),
        "sliding window (gpt_oss)": write_synthetic_moe(root / "gpt_oss", "gpt_oss", bits=4, seed=8),
        # one tensor a file per expert, in several shards: each expert's bytes are elsewhere
        "per-expert tensors in shards (mixtral)": write_synthetic_moe(root / "mixtral", "mixtral", bits=4, seed=9,
                                                                     layout="per-expert", max_shard_bytes=200_000),
    }


@pytest.mark.parametrize("name", ["shared expert (qwen2_moe)", "hybrid (qwen3_next)", "sliding window (gpt_oss)",
                                  "per-expert tensors in shards (mixtral)"])
def test_other_architectures_fetch_their_experts_exactly(other_models, name, fetching):
    """At the smallest legal budget (nearly every layer misses), against stock mlx_lm."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step as stock_step

    path = other_models[name]
    prompt = np.random.default_rng(3).integers(1, 8000, size=24).tolist()
    stock, _ = load(str(path))
    stock.set_dtype(mx.float32)
    want = [int(t) for t, _ in stock_step(mx.array(prompt), stock, max_tokens=MAX_TOKENS)]
    info = chronos_mlx.loader.plan_model(path).info
    model, runtime = fetching(path, info["top_k"] / info["num_experts"])
    assert _decode(runtime, model, prompt)[0] == want
    assert runtime.stats()["decode_misses"] > 0


def test_experts_stored_in_another_dtype_are_refused_clearly(demo_prompt_ids, monkeypatch):
    """The demo's scales are bf16 on disk, float32 in memory here: the device copies bytes as
    they are, so device-fetch says so instead of computing with wrong bytes."""
    monkeypatch.setattr(device_wait, "available", lambda: True)
    model, _, runtime = chronos_mlx.load(DEMO, expert_budget=0.5, dtype="float32")
    with pytest.raises(ChronosError, match="as they are on disk.*device-wait"):
        DeviceFetcher(runtime, kernel=host_fetch)


def test_a_simulated_drive_is_refused_clearly(demo_f32, monkeypatch):
    monkeypatch.setattr(device_wait, "available", lambda: True)
    model, _, runtime = chronos_mlx.load(demo_f32, expert_budget=0.5, io_sim="bandwidth=5GB/s")
    with pytest.raises(ChronosError, match="io-sim"):
        DeviceFetcher(runtime, kernel=host_fetch)


class _Driver:
    """libcuda's registration calls, answering `err`."""

    def __init__(self, err=0):
        self.err, self.registered, self.unregistered = err, [], []

        class Call:
            def __init__(self, fn):
                self.fn, self.argtypes = fn, None

            def __call__(self, *a):
                return self.fn(*a)

        self.cuMemHostRegister_v2 = Call(lambda p, n, flags: self.registered.append((p.value, n, flags)) or self.err)
        self.cuMemHostUnregister = Call(lambda p: self.unregistered.append(p.value) or 0)
        self.cuMemHostGetDevicePointer_v2 = Call(lambda out, p, flags: setattr(out._obj, "value", p.value) or 0)


def test_shards_are_registered_read_only_and_unregistered_at_close(demo_f32, monkeypatch):
    monkeypatch.setattr("chronos_mlx.upload.make_context_current", lambda lib: None)
    lib = _Driver()
    shards = RegisteredShards(list(demo_f32.glob("*.safetensors")), lib)
    ((addr, size, flags),) = lib.registered
    assert flags & 0x8 and flags & 0x2  # READ_ONLY | DEVICEMAP
    assert size % 4096 == 0 and list(shards.address.values()) == [addr]
    shards.close()
    assert lib.unregistered == [addr]


def test_a_gpu_that_cannot_map_the_shards_is_a_clear_error(demo_f32, monkeypatch):
    monkeypatch.setattr("chronos_mlx.upload.make_context_current", lambda lib: None)
    with pytest.raises(ChronosError, match="cuMemHostRegister error 2.*device-wait"):
        RegisteredShards(list(demo_f32.glob("*.safetensors")), _Driver(err=2))


def test_shards_larger_than_most_of_host_memory_are_refused(demo_f32, monkeypatch):
    monkeypatch.setattr(device_wait, "available", lambda: True)
    monkeypatch.setattr(device_fetch, "host_memory_bytes", lambda: 10_000)
    model, _, runtime = chronos_mlx.load(demo_f32, expert_budget=0.5)
    lib = _Driver()
    with pytest.raises(ChronosError, match="page-locked in host memory"):
        DeviceFetcher(runtime, kernel=host_fetch, lib=lib, register=True)
    assert lib.registered == []


def test_auto_never_takes_device_fetch_it_would_lock_the_whole_model_in_memory(demo_f32, monkeypatch):
    from chronos_mlx.generate import resolve_sync

    monkeypatch.setattr(device_wait, "available", lambda: True)
    model, _, runtime = chronos_mlx.load(demo_f32, expert_budget=0.5)
    assert resolve_sync("auto", runtime) == "device-wait"
    assert resolve_sync("device-fetch", runtime) == "device-fetch"  # asked for by name


def test_the_stats_say_which_routing_ran(demo_f32, demo_prompt_ids, fetching):
    model, runtime = fetching(demo_f32, 0.5)
    _decode(runtime, model, demo_prompt_ids, max_tokens=3)
    assert runtime.stats()["sync"] == "device-fetch"
    assert runtime.stats()["device_fetch_setup_s"] >= 0


def _row(runtime, state, tag) -> np.ndarray:
    """The journal row a call of the kernel on `state` wrote (warm-up's throwaway layer: a copy)."""
    layer = next((i for i, s in enumerate(runtime.waiter.state) if s is state), None)
    if layer is None:
        return np.zeros(8, dtype=np.uint32)
    return runtime.waiter.journal.rows[layer, int(np.array(tag)[0]) % 4]


def test_a_kernel_that_could_not_fetch_makes_the_step_an_error(demo_f32, demo_prompt_ids, fetching, monkeypatch):
    model, runtime = fetching(demo_f32, 0.25)

    def failing(ids, state, tag, **kw):
        slots = host_fetch(ids, state, tag, **kw)
        _row(runtime, state, tag)[3] = 1  # the kernel's flag
        return slots

    monkeypatch.setattr(runtime.waiter, "_kernel", failing)
    with pytest.raises(DeviceWaitError, match="could not fetch"):
        _decode(runtime, model, demo_prompt_ids)


def test_a_step_whose_record_is_missing_is_an_error(demo_f32, demo_prompt_ids, fetching, monkeypatch):
    """The loop reads each layer's journal row of the step's pass; a row that holds another pass
    (overwritten, or never written) refuses the step rather than guess its counts."""
    model, runtime = fetching(demo_f32, 0.25)

    def forgetful(ids, state, tag, **kw):
        slots = host_fetch(ids, state, tag, **kw)
        _row(runtime, state, tag)[0] = 0
        return slots

    monkeypatch.setattr(runtime.waiter, "_kernel", forgetful)
    with pytest.raises(DeviceWaitError, match="no record"):
        _decode(runtime, model, demo_prompt_ids)


def test_a_step_whose_prefetch_left_no_record_is_an_error(demo_f32, demo_prompt_ids, fetching, monkeypatch):
    """A prefetch's row counts bytes the step read: one that holds another pass refuses the step too."""
    from chronos_mlx.predict_runtime import attach_predictor

    model, runtime = fetching(demo_f32, 0.25)
    attach_predictor(model, runtime, "gate")

    def forgetful(ids, state, tag, guess=False, **kw):
        slots = host_fetch(ids, state, tag, guess=guess, **kw)
        layer = next((i for i, s in enumerate(runtime.waiter.state) if s is state), None)
        if guess and layer is not None:
            runtime.waiter.prefetch_journal.rows[layer, int(np.array(tag)[0]) % 4][0] = 0
        return slots

    monkeypatch.setattr(runtime.waiter, "_kernel", forgetful)
    with pytest.raises(DeviceWaitError, match="prefetch left no record"):
        _decode(runtime, model, demo_prompt_ids)


@cuda
@pytest.mark.parametrize("budget", [0.5, 0.125])
def test_on_cuda_layers_that_fetch_their_own_experts_give_stock_tokens(budget, demo_prompt_ids):
    want = stock_greedy(DEMO, demo_prompt_ids, MAX_TOKENS, dtype=mx.bfloat16)[0]
    model, _, runtime = chronos_mlx.load(DEMO, expert_budget=budget, dtype="bfloat16")
    got = _decode(runtime, model, demo_prompt_ids)[0]
    again = stock_greedy(DEMO, demo_prompt_ids, MAX_TOKENS, dtype=mx.bfloat16)[0]
    # Stock itself is not deterministic on CUDA where bf16 logits tie: compare what it repeats.
    n = next((i for i, (a, b) in enumerate(zip(want, again)) if a != b), len(want))
    assert got[:n] == want[:n]
    assert runtime.stats()["decode_misses"] > 0


def test_the_device_starts_from_the_host_policys_history(demo_f32, fetching):
    """Each expert's decayed use now, and its recency, as the host's `usage` policy has them:
    the device then evicts in the order the host would have."""
    model, runtime = fetching(demo_f32, 0.5)
    policy = runtime.cache.layers[0].policy
    for used in ([1, 2, 3], [2, 3], [3, 4], [5]):
        policy.touch(used)
    runtime.waiter.begin()
    v = runtime.waiter.state[0]["views"]
    now = runtime.waiter._passes + 1  # the first pass's stamp
    h = policy.half_life
    effective = v["score"] * np.exp2(-(now - v["stamp"].astype(np.int64)) / h)
    host = (np.array(policy.live) + np.array(policy._prior)) / policy._scale() * 2 ** (-1 / h)
    assert np.allclose(effective[[1, 2, 3, 4, 5]], host[[1, 2, 3, 4, 5]], rtol=1e-5)
    stamps = v["stamp"].astype(np.int64)
    assert stamps[5] > stamps[4] == stamps[3] > stamps[2] > stamps[1]  # the last use first
    runtime.waiter.end()


def test_a_shard_changed_since_it_was_mapped_stops_the_next_generation_with_a_clear_error(tmp_path, demo_f32,
                                                                                         demo_prompt_ids, fetching):
    import os
    import shutil

    from chronos_mlx.errors import ShardError

    path = tmp_path / "model"
    shutil.copytree(demo_f32, path)
    model, runtime = fetching(path, 0.5)
    _decode(runtime, model, demo_prompt_ids, max_tokens=2)
    shard = next(path.glob("*.safetensors"))
    os.utime(shard, ns=(1, 1))  # rewritten in place: its signature changes
    # Before any step runs (a prefill that loads nothing would not notice): the device never copies from it.
    with pytest.raises(ShardError, match="while the model was in use"):
        runtime.waiter.begin()
    with pytest.raises(ShardError, match="while the model was in use"):
        _decode(runtime, model, demo_prompt_ids, max_tokens=2)


def test_layers_that_hold_every_expert_launch_no_kernel_and_give_stock_tokens(reference, demo_f32, demo_prompt_ids,
                                                                              fetching):
    """At a budget that holds the model nothing can miss or be evicted: the steps are stock's
    graph (no fetch kernel, no journal row), every use a hit."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].size)
        return host_fetch(*args, **kwargs)

    model, runtime = fetching(demo_f32, 1.0)
    runtime.waiter._kernel = counted
    _decode(runtime, model, demo_prompt_ids)  # the first generation loads what prefill did not
    calls.clear()
    tokens, logprobs = _decode(runtime, model, demo_prompt_ids)
    assert_stock((tokens, logprobs), reference)
    assert runtime.waiter.resident == frozenset(range(len(runtime.cache.layers)))
    assert calls == []
    assert runtime.stats()["decode_hit_rate"] == 1.0


def test_a_layer_short_of_experts_still_fetches_them(demo_f32, demo_prompt_ids, fetching):
    """Only layers that hold every expert skip the kernel: one whose expert was dropped fetches it."""
    model, runtime = fetching(demo_f32, 1.0)
    _decode(runtime, model, demo_prompt_ids)
    runtime.cache.forget_layer(3)
    runtime.cache.layers[3].dirty = True
    before = runtime.stats()["misses"]
    _decode(runtime, model, demo_prompt_ids)
    assert 3 not in runtime.waiter.resident
    assert runtime.stats()["misses"] > before


def test_a_steps_bookkeeping_is_done_on_a_worker_while_the_next_step_launches(demo_f32, demo_prompt_ids,
                                                                              fetching, monkeypatch):
    """The checks that make a step exact run before its token is given out; its hits, misses and
    the policy's history are recorded on another thread while the next step is launched (MLX
    launches without Python's lock) and joined before the loop goes on, and every one is in the
    figures once the generation ends."""
    import threading

    model, runtime = fetching(demo_f32, 0.25)
    cache = runtime.cache
    calls, inside = [], threading.Event()
    mark_used = cache.mark_used

    def recording(layer, experts):
        calls.append((threading.get_ident(), inside.is_set()))
        return mark_used(layer, experts)

    monkeypatch.setattr(cache, "mark_used", recording)
    beside = runtime.waiter.beside

    def watched(launch):
        inside.set()
        try:
            return beside(launch)
        finally:
            inside.clear()

    class Observer:  # hears every layer of every step, in order, also when told a step late
        def __init__(self):
            self.heard = []

        def observe(self, layer, experts):
            self.heard.append(layer)

    observer = Observer()
    runtime.observers.append(observer)
    monkeypatch.setattr(runtime.waiter, "beside", watched)
    _decode(runtime, model, demo_prompt_ids, max_tokens=8)
    runtime.observers.remove(observer)
    n_layers = len(cache.layers)
    assert observer.heard == list(range(n_layers)) * (len(observer.heard) // n_layers)
    # The prefill (one chunk here), then every step: the one fed the last prompt token, one a
    # generated token but the last, and the one fed the last token.
    assert len(observer.heard) == (1 + runtime.counters.generated_tokens + 1) * n_layers
    main = threading.get_ident()
    on_worker = [during for thread, during in calls if thread != main]
    assert len(on_worker) >= 4 * len(cache.layers)  # most steps' layers
    assert all(on_worker)  # never outside a launch: no Python state changed by two threads at once
    assert not runtime.waiter._pending  # all recorded by the end
    # The decode's figures count the steps after the first token (the last one fed the last
    # token): the step that gave the first token is recorded before they start.
    c = runtime.counters
    assert c.decode_hits + c.decode_misses == c.generated_tokens * runtime.info["top_k"] * len(cache.layers)


def test_a_generation_stopped_early_leaves_nothing_unrecorded_and_the_next_one_is_stock(reference, demo_f32,
                                                                                       demo_prompt_ids, fetching):
    """A caller that stops reading after a few tokens (a chat's Ctrl-C, a stop string): the steps
    that ran are all recorded when the generator closes, and the next generation starts from them."""
    model, runtime = fetching(demo_f32, 0.25)
    steps = generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=MAX_TOKENS, sync="device-fetch")
    first = [int(next(steps)[0]) for _ in range(3)]
    steps.close()
    assert first == reference[0][:3]
    assert not runtime.waiter._pending
    L = runtime.cache.layers
    assert sum(l.counters.hits + l.counters.misses for l in L) > 0
    assert _decode(runtime, model, demo_prompt_ids)[0] == reference[0]


def test_a_journal_row_holds_as_many_ids_as_a_layer_has_slots(tmp_path, fetching):
    """Routing sends a call to the kernel whenever its ids fit the layer's slots (several tokens
    at once, too): its journal row must hold them all, however many experts the model has."""
    from synthetic import write_synthetic_moe

    path = write_synthetic_moe(tmp_path / "wide", "qwen3_moe", bits=4, seed=3, geometry={"num_experts": 128})
    model, runtime = fetching(path, 0.75)
    slots = max(L.num_slots for L in runtime.cache.layers)
    assert slots > 64
    assert runtime.waiter.journal.capacity >= slots and runtime.waiter.prefetch_journal.capacity >= slots
