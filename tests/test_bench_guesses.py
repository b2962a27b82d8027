"""bench_guesses.py: next-layer guesses for trained-like routing, as good as a trained model's."""

from dataclasses import replace

import mlx.core as mx
import pytest

import chronos_mlx
from chronos_mlx import bench as B
from chronos_mlx import bench_guesses as G
from chronos_mlx import bench_routing as R
from conftest import stock_replay

TOL = 0.07


@pytest.fixture(scope="module")
def calibrated(moe64):
    prompts, forced = B.replay_texts("en", moe64, limit=2, max_prompt_tokens=32, max_tokens=64)
    seqs, n_prompts = [p + f for p, f in zip(prompts, forced)], [len(p) for p in prompts]
    target = G.demo_next_layer_recall(seqs, n_prompts, 8)  # synthetic checkpoints share the demo's tokenizer
    params = R.RoutingParams(64, 8, alpha=1.5)
    noise, fitted = G.calibrate_guess_noise(params, seqs, n_prompts, 8, target)
    return replace(params, guess_noise=noise), target, fitted, prompts, forced


def test_guess_recall_falls_from_perfect_to_chance_as_the_noise_grows():
    params = R.RoutingParams(64, 8, alpha=1.5)
    seqs, n_prompts = [list(range(100, 180))], [16]
    assert G.guess_recall(params, seqs, n_prompts, 8, 0.0) == 1.0
    recalls = [G.guess_recall(params, seqs, n_prompts, 8, s) for s in (0.2, 0.5, 1.0, 4.0)]
    assert recalls == sorted(recalls, reverse=True)
    assert recalls[-1] < 0.3  # chance: 8 of 64


def test_table_guesses_find_the_next_layers_experts_as_often_as_the_demos_gate_predictor(moe64, calibrated):
    params, target, fitted, prompts, forced = calibrated
    assert 0.3 < target < 0.95  # a trained model's: neither chance nor perfect
    assert abs(fitted - target) <= TOL
    # What a decoding runtime measures with them attached (per-layer routing scores every guess).
    row = B.measure(B.BenchConfig("table", budget="0.5", sync="per-layer", options={"predictor": "table"},
                                  setup=R.routing_setup(params)),
                    moe64, prompts, max_tokens=64, repeats=1, warmup=0, forced=forced)
    assert row.get("error") is None
    assert abs(row["prediction_recall"] - target) <= TOL, (row["prediction_recall"], target)
    assert row["prefetch_hits_per_token"] > 0


def test_table_guesses_change_speed_only_never_the_logprobs(moe64, calibrated):
    from chronos_mlx.bench_guesses import TableGuesses
    from chronos_mlx.generate import generate_step

    params, _, _, prompts, forced = calibrated
    prompt, f = prompts[0], forced[0][:24]
    ref = [lp for _, lp in stock_replay(moe64, params, prompt, f)]
    model, _, runtime = chronos_mlx.load(moe64, expert_budget=0.25, dtype="float32")
    R.install_trained_routing(model, params)
    runtime.predictor, runtime.guesses = TableGuesses(model._chronos_bench_routing, params.guess_noise), 8
    cache, sampler = B._decoding(model, prompt, f, None)
    got = [(t, lp) for t, lp in generate_step(mx.array(prompt), model, runtime, max_tokens=len(f), sync="per-layer",
                                              sampler=sampler, prompt_cache=cache)]
    assert [t for t, _ in got] == f
    for (_, a), b in zip(got, ref):
        assert mx.allclose(a, b, atol=1e-4).item()
    assert runtime.cache_totals()["prefetch_hits"] > 0  # the guesses were loaded and used


def test_bench_refuses_table_guesses_without_a_calibrated_routing(moe64):
    with pytest.raises(ValueError, match="calibrated guess noise"):
        B.measure(B.BenchConfig("table", budget="0.5", sync="per-layer", options={"predictor": "table"}),
                  moe64, [[1, 2, 3]], max_tokens=2, repeats=1, warmup=0)


def test_device_wait_requests_carry_table_guesses_exactly_and_ask_less(moe64, calibrated, monkeypatch):
    """The case they are built for: under device-wait routing (here the host stand-in of the
    kernel, tests/test_device_wait.py) a request carries the next layer's guesses; when they
    cover its misses that layer does not ask. Replay logprobs stay stock's."""
    from chronos_mlx import device_wait, wait_kernels
    from chronos_mlx.bench_guesses import TableGuesses
    from chronos_mlx.device_wait import DeviceWaiter, Mailbox, host_kernel
    from chronos_mlx.generate import generate_step

    if wait_kernels.available():
        pytest.skip("on CUDA the kernel itself is measured instead (scripts/device_wait_check.sh)")
    monkeypatch.setattr(device_wait, "available", lambda: True)
    params, _, _, prompts, forced = calibrated
    prompt, f = prompts[0], forced[0][:24]
    ref = [lp for _, lp in stock_replay(moe64, params, prompt, f)]
    requests = {}
    for guessed in (False, True):
        model, _, runtime = chronos_mlx.load(moe64, expert_budget=0.5, dtype="float32")
        R.install_trained_routing(model, params)
        if guessed:
            runtime.predictor, runtime.guesses = TableGuesses(model._chronos_bench_routing, params.guess_noise), 8
        box = Mailbox.host()
        runtime.waiter = DeviceWaiter(runtime, mailbox=box, kernel=host_kernel(box))
        try:
            cache, sampler = B._decoding(model, prompt, f, None)
            got = list(generate_step(mx.array(prompt), model, runtime, max_tokens=len(f), sync="device-wait",
                                     sampler=sampler, prompt_cache=cache))
        finally:
            runtime.waiter.close()
        assert [t for t, _ in got] == f
        for (_, a), b in zip(got, ref):
            assert mx.allclose(a, b, atol=1e-4).item()
        requests[guessed] = runtime.waiter.requests
    assert 0 < requests[True] < requests[False], requests
