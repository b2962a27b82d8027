"""prefetch: which layers a guess may fill, how guesses are scored, and that a layer waits
for the decisions that target it. (Decoding with predictors, exact against stock mlx_lm,
is in test_predict_runtime.py.)"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from chronos_mlx.prefetch import safe_target, score_prediction, wait_planned


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


def test_a_layer_waits_for_the_decision_that_targets_it():
    done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: (time.sleep(0.05), done.set()))
        rt = SimpleNamespace(_planned={4: fut}, counters=SimpleNamespace(io_wait_s=0.0))
        wait_planned(rt, 4)
        assert done.is_set() and rt._planned == {}
        assert rt.counters.io_wait_s >= 0.04  # prediction's cost on the critical path: a stall
        wait_planned(rt, 5)  # nothing planned: returns at once
