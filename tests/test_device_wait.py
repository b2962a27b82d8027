"""Device-wait routing (device_wait.py): a MoE layer waits on the device for its experts.

The kernel asks the host only when an id is absent from the layer's wait table; a service
thread loads, rewrites the table and answers. On a machine without CUDA the same protocol
runs with the host in the kernel's place (`Mailbox.host()`, `host_kernel`): the service
thread, the tables, the accounting and the decode loop are the shipped ones. Tokens are
compared with stock mlx_lm's. The kernel itself is tested where MLX's CUDA backend is.
"""

import threading

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx import device_wait, wait_kernels
from chronos_mlx.device_wait import ABSENT, DevicePull, DeviceWaiter, Mailbox, MissService, host_kernel
from chronos_mlx.generate import generate_step
from conftest import DEMO, assert_stock, stock_greedy

MAX_TOKENS = 12
cuda = pytest.mark.skipif(not wait_kernels.available(), reason="needs MLX's CUDA backend")


def _not_on_cuda():
    """The host stand-in writes slots from the host while steps run, which CUDA's managed
    memory cannot take: there the real kernel is tested instead (the `cuda` tests)."""
    if wait_kernels.available():
        pytest.skip("on CUDA the kernel itself is tested instead of the host stand-in")


@pytest.fixture(scope="module")
def reference(demo_prompt_ids):
    return stock_greedy(DEMO, demo_prompt_ids, MAX_TOKENS)


def _host_waiter(runtime, pull=False):
    _not_on_cuda()
    box = Mailbox.host()
    alloc = (lambda n: np.zeros(n, dtype=np.uint8)) if pull else None
    return DeviceWaiter(runtime, mailbox=box, kernel=host_kernel(box), pull=pull, staging_alloc=alloc)


@pytest.fixture
def waiting(monkeypatch):
    """make(budget) -> (model, runtime): the demo model with a stand-in waiter (closed after the test)."""
    monkeypatch.setattr(device_wait, "available", lambda: True)
    made = []

    def make(budget, pull=False, path=None):
        model, _, runtime = chronos_mlx.load(path, expert_budget=budget)
        runtime.waiter = _host_waiter(runtime, pull)
        made.append(runtime.waiter)
        return model, runtime

    yield make
    for waiter in made:
        waiter.close()


def _decode(runtime, model, prompt_ids):
    out = list(generate_step(mx.array(prompt_ids), model, runtime, max_tokens=MAX_TOKENS, sync="device-wait"))
    return [int(t) for t, _ in out], [lp for _, lp in out]


@pytest.mark.parametrize("budget,pull", [(0.5, False), (0.125, False), (0.5, True), (0.125, True)])
def test_layers_that_wait_for_their_experts_give_stock_tokens(budget, pull, reference, demo_prompt_ids, waiting):
    """pull: the service reads loads into staging and the waiting kernel copies them (DevicePull)."""
    model, runtime = waiting(budget, pull)
    assert_stock(_decode(runtime, model, demo_prompt_ids), reference)
    stats = runtime.stats()
    assert stats["device_waits"] > 0  # misses went through the service thread
    assert stats["decode_misses"] > 0
    # One read of the step's routing (and one of its token) a step, never one a layer.
    assert stats["host_syncs_per_token"] <= 2.5


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    from conftest import synthetic_models

    cases = {"shared expert (qwen2_moe)": ("qwen2_moe", 6), "hybrid (qwen3_next)": ("qwen3_next", 7),
             "sliding window (gpt_oss)": ("gpt_oss", 8)}
    return synthetic_models(tmp_path_factory.mktemp("waiting"), cases)


@pytest.mark.parametrize("name", ["shared expert (qwen2_moe)", "hybrid (qwen3_next)", "sliding window (gpt_oss)"])
@pytest.mark.parametrize("pull", [False, True])
def test_other_architectures_wait_for_their_experts_exactly(other_models, name, pull, monkeypatch):
    """At the smallest legal budget (nearly every layer asks), against stock mlx_lm."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step as stock_step

    path = other_models[name]
    prompt = np.random.default_rng(3).integers(1, 8000, size=24).tolist()
    stock, _ = load(str(path))
    stock.set_dtype(mx.float32)
    want = [int(t) for t, _ in stock_step(mx.array(prompt), stock, max_tokens=MAX_TOKENS)]
    monkeypatch.setattr(device_wait, "available", lambda: True)
    info = chronos_mlx.loader.plan_model(path).info
    model, _, runtime = chronos_mlx.load(path, expert_budget=info["top_k"] / info["num_experts"])
    runtime.waiter = _host_waiter(runtime, pull)
    try:
        got = [int(t) for t, _ in generate_step(mx.array(prompt), model, runtime, max_tokens=MAX_TOKENS,
                                                sync="device-wait")]
    finally:
        runtime.waiter.close()
    assert got == want
    assert runtime.stats()["device_waits"] > 0


@pytest.mark.parametrize("pull", [False, True])
def test_requests_carry_guesses_for_the_next_layer_which_spare_its_own_requests(reference, demo_prompt_ids, waiting,
                                                                                 pull):
    """With a predictor (here the next layer's router on this layer's input), a request also
    carries guesses for the next layer, loaded while the device waits (pulled: copied by the
    device with that layer's new table). Tokens stay stock's; fewer layers have to ask."""
    from chronos_mlx.predict_runtime import attach_predictor

    model, runtime = waiting(0.5, pull)
    _decode(runtime, model, demo_prompt_ids)
    without = runtime.waiter.requests
    model, runtime = waiting(0.5, pull)
    attach_predictor(model, runtime, "gate")
    runtime.guess_reads = "load"
    ids, logprobs = _decode(runtime, model, demo_prompt_ids)
    assert ids == reference[0]
    for ours, theirs in zip(logprobs, reference[1]):
        assert mx.array_equal(ours, theirs)
    assert runtime.waiter.requests < without
    assert runtime.cache_totals()["prefetch_hits"] > 0


def test_a_guess_that_cannot_be_loaded_empties_its_layer_and_the_request_is_answered(reference, demo_prompt_ids,
                                                                                     waiting, monkeypatch):
    """Guesses are best effort: a failed load of them leaves their layer with nothing that looks
    resident (host and device tables), the request they came with is answered, tokens are stock's."""
    from chronos_mlx.predict_runtime import attach_predictor

    model, runtime = waiting(0.5, pull=True)
    attach_predictor(model, runtime, "gate")
    runtime.guess_reads = "load"
    real = runtime.cache.ensure

    def failing_guesses(layer, experts, protect=None, retries=0, prefetch=False):
        if prefetch:
            raise OSError("the drive went away (guesses only)")
        return real(layer, experts, protect, retries, prefetch)

    monkeypatch.setattr(runtime.cache, "ensure", failing_guesses)
    ids, _ = _decode(runtime, model, demo_prompt_ids)
    assert ids == reference[0]
    assert runtime.cache_totals()["prefetch_hits"] == 0


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_guesses_read_into_staging_after_the_answer_spare_reads_inside_requests(budget, demo_f32, demo_prompt_ids,
                                                                                waiting):
    """"stage" (preread.py): the service reads a request's guesses into staging
    once it has answered, and a later load of one lists its copies from there. Residency is
    decided as without guesses — the same requests, the same misses — and tokens are stock's
    (demo_f32: the demo stored in float32, whose experts need no conversion, as in bf16 on a GPU)."""
    from chronos_mlx.predict_runtime import attach_predictor

    want = stock_greedy(demo_f32, demo_prompt_ids, MAX_TOKENS)[0]
    model, runtime = waiting(budget, pull=True, path=demo_f32)
    assert _decode(runtime, model, demo_prompt_ids)[0] == want
    without = runtime.stats()
    model, runtime = waiting(budget, pull=True, path=demo_f32)
    attach_predictor(model, runtime, "gate")
    runtime.guess_reads = "stage"
    assert _decode(runtime, model, demo_prompt_ids)[0] == want
    stats = runtime.stats()
    assert stats["device_waits"] == without["device_waits"]
    assert stats["misses"] == without["misses"]
    assert 0 < stats["staged_guesses_used"] <= stats["staged_guess_reads"]
    assert stats["prefetch_hits"] == 0  # nothing was loaded on a guess


def test_a_staged_guess_whose_read_failed_is_read_by_the_load_that_needs_it(demo_f32, demo_prompt_ids, waiting,
                                                                           monkeypatch):
    from chronos_mlx.predict_runtime import attach_predictor
    from chronos_mlx.shards import ShardError

    want = stock_greedy(demo_f32, demo_prompt_ids, MAX_TOKENS)[0]
    model, runtime = waiting(0.5, pull=True, path=demo_f32)
    attach_predictor(model, runtime, "gate")
    runtime.guess_reads = "stage"
    real = runtime.cache.reader.read_runs

    def failing_for_guesses(runs, checked=False):
        if threading.current_thread().name == "chronos-preread":
            raise ShardError("the drive went away (guesses only)")
        return real(runs, checked)

    monkeypatch.setattr(runtime.cache.reader, "read_runs", failing_for_guesses)
    assert _decode(runtime, model, demo_prompt_ids)[0] == want
    assert runtime.stats()["staged_guesses_used"] == 0


def _no_slot_left_reserved(runtime):
    return all((L.expert_in != -2).all() for L in runtime.cache.layers)


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_posted_guesses_are_taken_by_their_layers_kernel_without_asking(budget, demo_f32, demo_prompt_ids, waiting):
    """"post": once a request's guesses for the next layer are staged, the service posts them
    (that layer's new table and the copies) for the next layer's kernel of the same pass, which
    takes the post before it looks its ids up. Layers whose misses were all posted never ask."""
    from chronos_mlx.predict_runtime import attach_predictor

    want = stock_greedy(demo_f32, demo_prompt_ids, MAX_TOKENS)[0]
    model, runtime = waiting(budget, pull=True, path=demo_f32)
    assert _decode(runtime, model, demo_prompt_ids)[0] == want
    without = runtime.stats()["device_waits"]
    model, runtime = waiting(budget, pull=True, path=demo_f32)
    attach_predictor(model, runtime, "gate")
    runtime.guess_reads = "post"
    assert _decode(runtime, model, demo_prompt_ids)[0] == want
    waiter = runtime.waiter
    assert 0 < waiter.posts_taken <= waiter.posts
    assert runtime.stats()["device_waits"] < without
    assert runtime.cache_totals()["prefetch_hits"] > 0
    assert _no_slot_left_reserved(runtime)


def test_a_post_that_comes_too_late_is_not_taken_and_the_host_agrees(demo_f32, demo_prompt_ids, waiting):
    """Every other kernel looks for a post before the service has left it (it passes without
    one): such a post is withdrawn unused, its victims are resident again and its staged bytes
    serve a later load. Tokens stay stock's; no slot stays reserved."""
    from chronos_mlx.predict_runtime import attach_predictor

    want = stock_greedy(demo_f32, demo_prompt_ids, MAX_TOKENS)[0]
    model, runtime = waiting(0.5, pull=True, path=demo_f32)
    attach_predictor(model, runtime, "gate")
    runtime.guess_reads = "post"
    waiter, calls = runtime.waiter, []
    kernel = waiter._kernel

    def early_every_other(*args, posts=False, **kwargs):
        calls.append(posts)
        return kernel(*args, posts=posts and len(calls) % 2 == 0, **kwargs)

    waiter._kernel = early_every_other
    assert _decode(runtime, model, demo_prompt_ids)[0] == want
    assert 0 < waiter.posts_taken < waiter.posts
    assert _no_slot_left_reserved(runtime)
    for L in runtime.cache.layers:  # host maps agree with each other
        resident = np.flatnonzero(L.slot_of >= 0)
        assert (L.expert_in[L.slot_of[resident]] == resident).all()


@pytest.mark.parametrize("room", [0, 9, 10, 28, 1000])
def test_guesses_take_only_the_room_the_kernels_plan_has_left(room, waiting):
    """A request's own copies come first; its guesses get what is left of the kernel's plan —
    nine copies an expert at most, one for the layer's new table — so an answer never
    overflows it (the device would drop the rest)."""
    model, runtime = waiting(0.125, pull=True)
    waiter, L = runtime.waiter, runtime.cache.layers[3]
    absent = [e for e in range(L.num_experts) if L.slot_of[e] < 0][:8]
    waiter._prefetch(3, np.array(absent, dtype=np.uint32), room=room)
    listed = waiter.pull.take()
    assert len(listed) <= room
    loaded = [e for e in absent if L.slot_of[e] >= 0]
    assert len(loaded) == min(len(absent), max(0, (room - 1) // len(L.params)))
    table = waiter.views[3].ctypes.data
    assert any(dst == table for _, dst, _ in listed) == bool(loaded)  # the new table goes with them


def test_seeded_sampling_gives_stock_tokens_too(demo_prompt_ids, waiting):
    """No step is ever discarded and redone, so a seeded sampler draws the same random
    numbers as stock mlx_lm's loop (optimistic routing cannot promise that)."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step as stock_step
    from mlx_lm.sample_utils import make_sampler

    stock, _ = load(str(DEMO))
    stock.set_dtype(mx.float32)
    mx.random.seed(7)
    want = [int(t) for t, _ in stock_step(mx.array(demo_prompt_ids), stock, max_tokens=MAX_TOKENS,
                                          sampler=make_sampler(temp=1.0))]
    model, runtime = waiting(0.25)
    mx.random.seed(7)
    got = [int(t) for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=MAX_TOKENS,
                                            sync="device-wait", sampler=make_sampler(temp=1.0))]
    assert got == want
    assert runtime.stats()["device_waits"] > 0


def test_a_service_that_yields_instead_of_sleeping_gives_stock_tokens(reference, demo_prompt_ids, waiting, monkeypatch):
    monkeypatch.setenv("CHRONOS_WAIT_POLL_US", "0")
    model, runtime = waiting(0.25)
    assert runtime.waiter.service.poll_s == 0
    ids, _ = _decode(runtime, model, demo_prompt_ids)
    assert ids == reference[0]


def test_every_use_is_counted_once_as_a_hit_or_a_miss(demo_prompt_ids, waiting):
    model, runtime = waiting(0.25)
    _decode(runtime, model, demo_prompt_ids)
    before = runtime.cache_totals()
    _decode(runtime, model, demo_prompt_ids[:1])  # a one-token prompt: every pass routed by the waiter
    after = runtime.cache_totals()
    uses = (MAX_TOKENS + 1) * len(runtime.cache.layers) * 8  # 13 passes (the one after the last token runs too), 8 MoE layers, top-8
    assert (after["hits"] - before["hits"]) + (after["misses"] - before["misses"]) == uses


def test_a_resident_layer_never_asks_the_host(demo_prompt_ids, waiting):
    model, runtime = waiting(1.0)
    _decode(runtime, model, demo_prompt_ids)
    assert runtime.waiter.requests == 0
    assert runtime.stats()["misses"] == 0


def test_the_kernels_run_once_before_the_first_step_without_asking(demo_prompt_ids, waiting):
    """`begin` warms the kernels for one decode token's ids (MLX compiles them then, not in a
    timed step), with every id resident: no request reaches the service."""
    model, runtime = waiting(0.5)
    calls = []
    kernel = runtime.waiter._kernel
    runtime.waiter._kernel = lambda ids, *a, **k: (calls.append(ids.size), kernel(ids, *a, **k))[1]
    runtime.waiter.begin()
    assert calls == [8] and runtime.waiter.requests == 0  # top-8
    runtime.waiter.begin()  # once per size
    assert calls == [8]
    runtime.waiter.end()


def test_what_the_loop_reads_back_from_a_step_is_made_in_host_memory(demo_prompt_ids, waiting, monkeypatch):
    """The step's ids are joined, and the logprobs the loop yields copied, on the CPU stream. On
    CUDA, reading a GPU buffer into numpy moves it to host memory while holding Python's lock,
    and that move waits for the device — whose next kernel may be waiting for the service
    thread, which needs the lock (a deadlock until the kernel gives up, seen on an H200)."""
    model, runtime = waiting(0.5)
    on_cpu = []
    for name in ("concatenate", "multiply"):
        real = getattr(mx, name)

        def spy(*a, _real=real, _name=name, **k):
            if k.get("stream") is mx.cpu:
                on_cpu.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(mx, name, spy)
    ids, _ = _decode(runtime, model, demo_prompt_ids)
    passes = MAX_TOKENS + 1  # the step after the last token runs too
    assert on_cpu.count("concatenate") == passes  # every pass's ids
    assert on_cpu.count("multiply") == passes  # every pass's logprobs


def test_between_generations_the_service_thread_does_not_poll(demo_prompt_ids, waiting):
    model, runtime = waiting(0.5)
    polling = []
    handle = runtime.waiter.service._handle

    def watched(layer, ids, tag=0):
        polling.append(runtime.waiter.service._active.is_set())
        handle(layer, ids, tag)

    runtime.waiter.service._handle = watched
    _decode(runtime, model, demo_prompt_ids)
    assert polling and all(polling)  # while steps ran
    assert not runtime.waiter.service._active.is_set()  # and not after
    assert not runtime.cache.copy_engine_paused


def test_a_failed_load_stops_the_generation_with_a_clear_error(demo_prompt_ids, waiting, monkeypatch):
    model, runtime = waiting(0.25)

    load_for = runtime.load_for

    def broken_while_decoding(*a, **k):  # the prefill's loads (main thread) still work
        if threading.current_thread() is not threading.main_thread():
            raise OSError("the drive went away")
        return load_for(*a, **k)

    monkeypatch.setattr(runtime, "load_for", broken_while_decoding)
    with pytest.raises(RuntimeError, match="loading experts for the device failed: the drive went away"):
        _decode(runtime, model, demo_prompt_ids)


def test_a_pulled_load_that_cannot_be_answered_leaves_nothing_that_looks_resident(
        reference, demo_prompt_ids, waiting, monkeypatch):
    """Experts read into staging are mapped before the device copies them: if the answer
    cannot be given, the layer is emptied (host and device tables), so a later generation on
    the same model is still exact."""
    model, runtime = waiting(0.25, pull=True)
    monkeypatch.setattr(device_wait, "max_copies", lambda n, g=0: 0)  # no answer fits
    with pytest.raises(RuntimeError, match="do not fit the kernel's plan"):
        _decode(runtime, model, demo_prompt_ids)
    monkeypatch.undo()
    monkeypatch.setattr(device_wait, "available", lambda: True)
    ids, logprobs = _decode(runtime, model, demo_prompt_ids)
    assert ids == reference[0]
    for ours, theirs in zip(logprobs, reference[1]):
        assert mx.array_equal(ours, theirs)


def test_a_layer_that_stopped_waiting_makes_the_step_an_error(demo_prompt_ids, monkeypatch):
    """A kernel that waited too long (the service gone) marks the mailbox and computes with
    whatever its table said: the loop must not hand out that step's token."""
    _not_on_cuda()
    monkeypatch.setattr(device_wait, "available", lambda: True)
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.5)
    box = Mailbox.host()
    ask = host_kernel(box)
    calls = []

    def giving_up(ids, table, mailbox, layer, tag=None, always=False, pull=False, **kw):
        calls.append(1)
        if len(calls) == 20:  # a decode step's layer
            box.words[device_wait.GAVE_UP] = 1
            return table[ids]
        return ask(ids, table, mailbox, layer, tag, always, pull, **kw)

    runtime.waiter = DeviceWaiter(runtime, mailbox=box, kernel=giving_up)
    yielded = []
    try:
        # The error says what the loading thread was doing (here: polling, nothing asked).
        with pytest.raises(RuntimeError, match=r"stopped waiting.*no request outstanding; the loading thread is in "
                                               r".*_run \(device_wait.py"):
            for tok, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=MAX_TOKENS,
                                        sync="device-wait"):
                yielded.append(tok)
    finally:
        runtime.waiter.close()
    assert len(yielded) < 20 // len(runtime.cache.layers)  # not the step that gave up, nor any after


def test_a_last_step_that_stopped_waiting_is_an_error_too(demo_prompt_ids, waiting, monkeypatch):
    """The step after the last token runs too (its KV entries stay, as in mlx_lm), and its last
    layers may still be waiting when the loop has read its routing: a kernel that gives up
    while the loop waits for it leaves a cache that is not stock's, so the generation ends
    with the error, after every (exact) token."""
    model, runtime = waiting(0.5)
    waiter, real_drain = runtime.waiter, device_wait._drain

    def a_kernel_gives_up_meanwhile(stream=None):
        waiter.mailbox.words[device_wait.GAVE_UP] += 1
        real_drain(stream)

    monkeypatch.setattr(device_wait, "_drain", a_kernel_gives_up_meanwhile)
    yielded = []
    with pytest.raises(RuntimeError, match="stopped waiting"):
        for tok, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=MAX_TOKENS,
                                    sync="device-wait"):
            yielded.append(tok)
    assert len(yielded) == MAX_TOKENS


def test_after_the_last_step_the_loop_waits_without_holding_pythons_lock(demo_prompt_ids, waiting, monkeypatch):
    """`mx.synchronize` keeps Python's lock while it waits: a kernel of the last step still
    waiting for the service thread (which needs the lock) would never be answered."""
    model, runtime = waiting(0.5)
    monkeypatch.setattr(mx, "synchronize", lambda *a: pytest.fail("mx.synchronize while kernels may wait"))
    ids, _ = _decode(runtime, model, demo_prompt_ids)
    assert len(ids) == MAX_TOKENS


def test_the_wait_table_marks_absent_experts_and_follows_loads(monkeypatch):
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.25)
    waiter = _host_waiter(runtime)
    try:
        waiter.begin()
        L = runtime.cache.layers[3]
        table = np.array(waiter.tables[3])
        resident = L.slot_of >= 0
        assert (table[~resident] == ABSENT).all()
        assert (table[resident] == L.slot_of[resident]).all()
        absent = np.flatnonzero(~resident)[:4].tolist()
        waiter._handle(3, np.array(absent, dtype=np.uint32))  # what the service does for a request
        table = np.array(waiter.tables[3])
        assert all(table[e] == L.slot_of[e] != ABSENT for e in absent)
        assert (table[L.slot_of < 0] == ABSENT).all()  # the experts evicted for them too
    finally:
        waiter.close()


def test_each_layers_kernel_reads_the_one_before_it_so_the_device_runs_them_in_turn(demo_prompt_ids, waiting):
    """One mailbox: two kernels asking at once would lose a request. Routing usually orders
    them (a router reads the layer below's output), but not always (the bench's table routers
    read none): so every kernel takes the previous kernel's output as an input, across passes
    too, and MLX's CUDA graphs run it after that one."""
    model, runtime = waiting(0.5)
    runtime.waiter.warm()  # (its one run is not part of a pass)
    inner = runtime.waiter._kernel
    seen = []

    def recording(ids, table, box, layer, tag=None, always=False, pull=False, after=None, **kw):
        out = inner(ids, table, box, layer, tag, always, pull, after=after, **kw)
        seen.append((after, out))
        return out

    runtime.waiter._kernel = recording
    list(generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=3, sync="device-wait"))
    assert len(seen) > 2 * len(runtime.cache.layers)  # the prefill and decode steps went through it
    assert seen[0][0] is None  # the generation's first kernel waits for nothing of ours
    for (_, before), (after, _) in zip(seen, seen[1:]):
        assert after is before
    assert runtime.waiter._after is None  # nothing kept once the generation has ended


@pytest.mark.parametrize("poll_s", [20e-6, 0.0])  # 0: yield the core between looks
def test_the_service_answers_each_request_in_turn(poll_s):
    box = Mailbox.host()
    seen = []
    service = MissService(box, lambda layer, ids, tag: seen.append((layer, ids.tolist())), poll_s=poll_s)
    try:
        ask = host_kernel(box)
        table = mx.array(np.arange(16, dtype=np.uint32))
        for layer in (2, 5):
            out = ask(mx.array([[3, 7]], dtype=mx.uint32), table, box.box, mx.array([layer], dtype=mx.uint32), always=True)
            assert np.array(out).tolist() == [[3, 7]]
    finally:
        service.stop()
    assert seen == [(2, [3, 7]), (5, [3, 7])]
    assert service.requests == 2


def test_a_pulled_load_stages_each_read_apart_until_its_copies_are_taken():
    """DevicePull hands out staging in turn (16-byte aligned: the device copies 16 bytes at a
    time) and lists copies with their staging addresses; nothing is reused before `take`."""
    pull = DevicePull(lambda n: np.zeros(n, dtype=np.uint8))
    a = pull.staging(100)
    pull.copy([(5000, 5000, 0, 60), (5000, 5060, 60, 40)])  # continuing each other: one copy
    b = pull.staging(50)
    pull.copy([(9000, 9000, 0, 50)])
    assert b.ctypes.data == a.ctypes.data + 112
    assert pull.take() == [(a.ctypes.data, 5000, 100), (b.ctypes.data, 9000, 50)]
    assert pull.staging(8).ctypes.data == a.ctypes.data  # taken: the staging starts over
    assert pull.take() == []


def test_device_wait_needs_cuda(demo_prompt_ids, monkeypatch):
    monkeypatch.setattr(device_wait, "available", lambda: False)
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.5)
    with pytest.raises(ValueError, match="CUDA"):
        next(generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=2, sync="device-wait"))


def test_while_layers_wait_for_their_experts_no_thread_uses_the_copy_engine(reference, demo_prompt_ids, waiting):
    """On CUDA a copy-engine copy into managed memory waits for the running kernels, one of
    which may be waiting for that very load: every load is a host write while steps run."""
    from test_upload import _with_memmove_upload

    model, runtime = waiting(0.25)
    _with_memmove_upload(runtime)
    up = runtime.cache.upload
    seen = []
    handle = runtime.waiter._handle

    def watched(layer, ids, tag=0):
        seen.append(runtime.cache.upload)
        handle(layer, ids, tag)

    runtime.waiter._handle = watched
    runtime.waiter.service._handle = watched
    ids, _ = _decode(runtime, model, demo_prompt_ids)
    assert ids == reference[0]
    assert seen and all(u is None for u in seen)
    assert up.copies > 0  # the prefill's loads went through the copy engine
    assert runtime.cache.upload is up  # and it is back once the generation ended


@cuda
@pytest.mark.parametrize("budget", [0.5, 0.125])
def test_on_cuda_layers_that_wait_for_their_experts_give_stock_tokens(budget, demo_prompt_ids):
    ref_ids, _ = stock_greedy(DEMO, demo_prompt_ids, MAX_TOKENS, dtype=mx.bfloat16)
    model, _, runtime = chronos_mlx.load(None, expert_budget=budget, dtype="bfloat16")
    ids, _ = _decode(runtime, model, demo_prompt_ids)  # the decode loop makes the CUDA waiter
    runtime.waiter.close()
    assert ids == ref_ids
    assert runtime.stats()["device_waits"] > 0
    assert runtime.waiter.pull.bytes > 0  # the loads were copied by the device


def test_the_cyclic_collector_is_off_while_steps_run_and_restored_after(demo_prompt_ids, waiting, monkeypatch):
    # A collection frees garbage holding Python's lock; on CUDA a device free then waits for a
    # kernel that may be waiting for the service thread (which needs the lock).
    import gc

    model, runtime = waiting(0.25)
    seen = []
    handle = runtime.waiter._handle

    def noting(*a, **k):
        seen.append(gc.isenabled())
        return handle(*a, **k)

    monkeypatch.setattr(runtime.waiter.service, "_handle", noting)
    assert gc.isenabled()
    _decode(runtime, model, demo_prompt_ids)
    assert seen and not any(seen)  # every request was answered with the collector off
    assert gc.isenabled()

    def failing(*a, **k):
        raise OSError("drive gone")

    monkeypatch.setattr(runtime.waiter.service, "_handle", failing)
    with pytest.raises(RuntimeError):
        _decode(runtime, model, demo_prompt_ids)
    assert gc.isenabled()  # restored after a failed generation too
    gc.disable()
    try:
        monkeypatch.setattr(runtime.waiter.service, "_handle", handle)
        _decode(runtime, model, demo_prompt_ids)
        assert not gc.isenabled()  # a caller's own choice is left as it was
    finally:
        gc.enable()


def test_while_steps_run_the_service_threads_loads_take_the_lean_path(reference, demo_prompt_ids, waiting, monkeypatch):
    # The service thread is then the only one that loads (no prefetch, no main-thread load):
    # no futures, one stat of the shards a request. Tokens stay stock's.
    from chronos_mlx.cache import ExpertCache

    model, runtime = waiting(0.25, pull=True)
    lean, general = [], []
    ensure_now, reserve = ExpertCache._ensure_now, ExpertCache._reserve

    def noting_lean(self, *a, **k):
        lean.append(threading.current_thread().name)
        return ensure_now(self, *a, **k)

    def noting_general(self, *a, **k):
        general.append(threading.current_thread().name)
        return reserve(self, *a, **k)

    monkeypatch.setattr(ExpertCache, "_ensure_now", noting_lean)
    monkeypatch.setattr(ExpertCache, "_reserve", noting_general)
    ids, _ = _decode(runtime, model, demo_prompt_ids)
    assert ids == reference[0]
    assert "chronos-miss-service" in lean
    assert "chronos-miss-service" not in general
    assert runtime.cache.deciding_thread is None  # after the generation, only the main thread again


def test_layers_that_hold_every_expert_launch_no_waiting_kernel_and_give_stock_tokens(reference, demo_prompt_ids,
                                                                                    waiting):
    """At a budget that holds the model no layer can miss: no kernel, no request, stock's tokens."""
    model, runtime = waiting(1.0)
    _decode(runtime, model, demo_prompt_ids)  # the first generation loads what prefill did not
    calls = []
    kernel = runtime.waiter._kernel

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    runtime.waiter._kernel = counted
    requests = runtime.stats()["device_waits"]
    assert_stock(_decode(runtime, model, demo_prompt_ids), reference)
    assert runtime.waiter.resident == frozenset(range(len(runtime.cache.layers)))
    assert calls == [] and runtime.stats()["device_waits"] == requests
