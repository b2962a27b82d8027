"""prefetch: which layers a guess may fill, how guesses are scored, and that the guesses made
at a host read are claimed there and then. (Decoding with predictors, exact against stock
mlx_lm, is in test_predict_runtime.py.)"""

import threading
from types import SimpleNamespace

import numpy as np

import chronos_mlx
from chronos_mlx.io import SimulatedSSD
from chronos_mlx.prefetch import safe_target, score_prediction, submit_guesses


def test_guesses_go_only_to_the_next_layer_and_to_layer_0_of_the_next_token():
    n = 8
    assert safe_target(3, 4, 0, n)  # next layer, this token
    assert not safe_target(3, 5, 0, n)  # two ahead: superseded by the next layer's own guess
    assert not safe_target(7, 8, 0, n)  # past the last MoE layer
    assert safe_target(5, 0, 1, n)  # layer 0 of the next token
    assert not safe_target(5, 5, 1, n)  # a later layer of the next token: its slots are in use
    assert not safe_target(5, 0, 2, n)


def test_recall_counts_the_used_experts_the_latest_guess_named():
    rt = SimpleNamespace(_predicted={(2, 0): {1, 2, 3}, (2, 1): {9}}, recall_hits=0, recall_total=0)
    score_prediction(rt, 2, np.array([1, 2, 7, 8]))
    assert (rt.recall_hits, rt.recall_total) == (2, 4)  # this token's guess, not the older one
    assert rt._predicted == {}
    score_prediction(rt, 2, np.array([5]))  # nothing guessed for it: not counted
    assert rt.recall_total == 4


def test_guesses_are_claimed_at_the_host_read_and_read_in_the_background():
    # Decisions (ranking, victims, slots) are taken on the calling thread at once, so the
    # targeted layer never waits for a decision; only the reads run on reader threads.
    _, _, rt = chronos_mlx.load(None, expert_budget=0.25)
    rt.cache.reader.simulator = SimulatedSSD(bandwidth=10e6, latency=0.05)  # reads stay in flight
    rt.predictor = SimpleNamespace(targets=[(1, 0)])  # guesses for the next layer of this token
    scores = np.zeros((1, 64), dtype=np.float32)
    scores[0, [5, 9, 40]] = [3.0, 2.0, 1.0]
    submit_guesses(rt, 2, scores)
    L = rt.cache.layers[3]
    assert {5, 9, 40} <= set(L.pending)  # claimed before submit_guesses returned
    assert {n for n in (t.name for t in threading.enumerate()) if n.startswith("chronos-plan")} == set()
    rt.load_for(3, [5, 9, 40])
    assert all(L.slot_of[e] >= 0 for e in (5, 9, 40)) and L.counters.misses == 0  # the prefetches served them


def test_without_reader_threads_guesses_wait_for_the_next_launch_then_read_inline():
    # io_threads=0: no reader thread. Read at once, the guesses would delay the launch of
    # the work the device could do meanwhile; they are claimed at once and read right after
    # the next launch (gates.close_gate, generate.launch) on the main thread.
    _, _, rt = chronos_mlx.load(None, expert_budget=0.25, io_threads=0, prewarm=False)
    assert rt.cache.pool is None and rt.cache.defer_prefetch
    rt.predictor, rt.guesses = SimpleNamespace(targets=[(1, 0)]), 3
    scores = np.zeros((1, 64), dtype=np.float32)
    scores[0, [5, 9, 40]] = [3.0, 2.0, 1.0]
    submit_guesses(rt, 2, scores)
    L = rt.cache.layers[3]
    assert {5, 9, 40} <= set(L.pending) and rt.cache.deferred  # claimed, not read
    assert all(L.slot_of[e] < 0 for e in (5, 9, 40))
    before = L.counters.bytes_read
    rt.cache.run_deferred()
    assert not rt.cache.deferred and not L.pending
    assert all(L.slot_of[e] >= 0 for e in (5, 9, 40))
    assert L.counters.bytes_read - before == 3 * rt.cache.bytes_on_disk_per_expert


def test_a_demand_load_never_waits_for_a_deferred_read():
    # A demand that wants a deferred guess (or needs its slot) reads the deferred batch
    # first, so nothing waits on a read no one would start.
    _, _, rt = chronos_mlx.load(None, expert_budget=0.25, io_threads=0, prewarm=False)
    rt.predictor, rt.guesses = SimpleNamespace(targets=[(1, 0)]), 2
    scores = np.zeros((1, 64), dtype=np.float32)
    scores[0, [5, 9]] = [3.0, 2.0]
    submit_guesses(rt, 2, scores)
    got = rt.load_for(3, [5, 9, 11])
    L = rt.cache.layers[3]
    assert got == [11] and not rt.cache.deferred
    assert all(L.slot_of[e] >= 0 for e in (5, 9, 11))


def test_no_scores_are_computed_where_no_target_lies_ahead():
    # The runtime's gate guesses only the next layer: at the last MoE layer there is nothing
    # to guess, and nothing is computed or read back there.
    import mlx.core as mx

    from chronos_mlx.predict_runtime import attach_predictor
    from chronos_mlx.prefetch import predict

    model, _, rt = chronos_mlx.load(None, expert_budget=0.25, prewarm=False)
    attach_predictor(model, rt, "gate")
    x = mx.zeros((1, 1, model.args.hidden_size))
    n = len(rt.cache.layers)
    assert predict(rt, n - 1, x) is None
    assert predict(rt, 0, x).shape == (1, 64)


def test_a_device_wait_request_carries_the_next_layers_best_guesses_as_a_device_array():
    """`next_layer_guesses`: the predictor's `runtime.guesses` best experts for layer + 1, on the
    device (nothing is read unless the layer asks); none after the last MoE layer, none from a
    predictor without a next-layer target."""
    import mlx.core as mx

    from chronos_mlx.prefetch import next_layer_guesses

    _, _, rt = chronos_mlx.load(None, expert_budget=0.5)
    scores = np.zeros((1, 64), dtype=np.float32)
    scores[0, [5, 9, 40]] = [3.0, 2.0, 1.0]
    rt.predictor = SimpleNamespace(targets=[(1, 0)], num_layers=8, scores=lambda layer, x: mx.array(scores))
    rt.guesses = 3
    layer, ids = next_layer_guesses(rt, 2, mx.zeros((1, 1, 16)))
    assert layer == 3 and ids.dtype == mx.uint32
    assert sorted(np.array(ids).tolist()) == [5, 9, 40]
    assert next_layer_guesses(rt, 7, mx.zeros((1, 1, 16))) is None  # the last MoE layer
    rt.predictor = SimpleNamespace(targets=[(0, 1)], num_layers=8, scores=lambda layer, x: mx.array(scores))
    assert next_layer_guesses(rt, 2, mx.zeros((1, 1, 16))) is None  # next-token guesses only


def test_guesses_a_kernel_reads_are_computed_on_the_stream_being_built():
    """A kernel's input from another stream makes MLX wait on the host within the evaluation
    (its CUDA fence), at every layer: the next layer's guesses, which device-wait's and
    device-fetch's kernels read, are computed on the caller's stream, not the predictor's own."""
    import mlx.core as mx

    from chronos_mlx.prefetch import next_layer_guesses

    _, _, rt = chronos_mlx.load(None, expert_budget=0.5)
    rt.predictor = SimpleNamespace(targets=[(1, 0)], num_layers=8,
                                   scores=lambda layer, x: mx.arange(64, dtype=mx.float32)[None])
    rt.guesses = 2
    rt.predict_stream = "not a stream"  # any use of it fails
    layer, ids = next_layer_guesses(rt, 2, mx.zeros((1, 1, 16)))
    assert layer == 3 and sorted(np.array(ids).tolist()) == [62, 63]
