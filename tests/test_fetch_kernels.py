"""The fetch kernel of device-fetch routing (fetch_kernels.py): which slot an absent expert
takes, what it copies, what it counts — on the host stand-in everywhere, compiled with NVRTC
where there is no GPU, and run on CUDA where MLX's CUDA backend is.
"""

import mlx.core as mx
import numpy as np
import pytest

from chronos_mlx import fetch_kernels, wait_kernels
from chronos_mlx.fetch_kernels import Journal, fetch_experts, host_fetch
from chronos_mlx.wait_kernels import ABSENT
from test_wait_kernels import _compile_like_mlx, _nvrtc

cuda = pytest.mark.skipif(not wait_kernels.available(), reason="needs MLX's CUDA backend")
E, S, T, NB = 6, 3, 2, 64  # experts, slots, tensors an expert, bytes a tensor of an expert


def _journal_state(journal: Journal, prefetches: Journal) -> dict:
    state = {"journal": journal.address(0), "prefetch_journal": prefetches.address(0)}
    mx.eval(list(state.values()))
    state["journal_width"], state["journal_of"], state["prefetch_journal_of"] = journal.width, journal, prefetches
    return state


def _layer(source: np.ndarray, table, owner, score, stamp, lib=None):
    """A layer's device arrays over `source` ([E, T, NB] bytes, the 'shards') and slots of zeros;
    its journal in page-locked memory with `lib` (libcuda)."""
    slots = [mx.zeros((S, NB), dtype=mx.uint8) for _ in range(T)]
    mx.eval(slots)
    from chronos_mlx.cache import _numpy_view

    views = [_numpy_view(s) for s in slots]
    src = np.array([[source[e, t].ctypes.data for t in range(T)] for e in range(E)], dtype=np.uint64).reshape(-1)
    state = {
        "table": mx.array(np.array(table, dtype=np.uint32)), "owner": mx.array(np.array(owner, dtype=np.uint32)),
        "score": mx.array(np.array(score, dtype=np.float32)), "stamp": mx.array(np.array(stamp, dtype=np.uint32)),
        "src": mx.array(src), "dst": mx.array(np.array([v.ctypes.data for v in views], dtype=np.uint64)),
        "nbytes": mx.array(np.full(T, NB, dtype=np.uint64)),
    }
    mx.eval(list(state.values()))
    return {**state, **_journal_state(Journal(1, 8, lib), Journal(1, 8, lib))}, views


@pytest.fixture
def source():
    return np.random.default_rng(0).integers(0, 256, size=(E, T, NB), dtype=np.uint8)


def _run(kernel, ids, state, now, **kw):
    """(slot ids, [loaded, evicted, failed]) of one call, the counts from the journal it wrote;
    with guess=True, (slot ids, counts, the experts it loaded) from the prefetch journal."""
    slots = kernel(mx.array(np.array(ids, dtype=np.uint32)), state, mx.array([now], dtype=mx.uint32), **kw)
    slots = np.array(slots).tolist()  # the call has run: its journal row is written
    if kw.get("guess"):
        loaded, counts = state["prefetch_journal_of"].read(0, now)
        return slots, counts, loaded.tolist()
    recorded, counts = state["journal_of"].read(0, now)
    assert recorded.tolist() == list(ids)
    return slots, counts


def test_resident_ids_map_to_their_slots_and_nothing_is_copied(source):
    state, views = _layer(source, [0, ABSENT, 2, 1, ABSENT, ABSENT], [0, 3, 2], [1, 0, 1, 1, 0, 0], [9] * E)
    slots, counts = _run(host_fetch, [3, 0], state, 10)
    assert slots == [1, 0]
    assert counts == [0, 0, 0]
    assert all(not v.any() for v in views)


def test_an_absent_expert_takes_a_free_slot_first_and_its_bytes_arrive(source):
    state, views = _layer(source, [0, ABSENT, ABSENT, ABSENT, ABSENT, ABSENT], [0, ABSENT, ABSENT], [0] * E, [9] * E)
    slots, counts = _run(host_fetch, [4, 0], state, 10)
    assert slots == [1, 0]
    assert counts == [1, 0, 0]
    for t in range(T):
        assert np.array_equal(views[t][1], source[4, t])
    assert np.array(state["table"]).tolist()[4] == 1 and np.array(state["owner"]).tolist() == [0, 4, ABSENT]


def test_the_victim_is_the_least_used_expert_the_call_does_not_use(source):
    # Slots hold 0, 1, 2; expert 1 is the least used but this call uses it; 2 is next.
    state, views = _layer(source, [0, 1, 2, ABSENT, ABSENT, ABSENT], [0, 1, 2], [5.0, 0.5, 1.0, 0, 0, 0], [9] * E)
    slots, counts = _run(host_fetch, [1, 5], state, 10)
    assert slots == [1, 2]
    assert counts == [1, 1, 0]
    table = np.array(state["table"]).tolist()
    assert table[2] == ABSENT and table[5] == 2
    for t in range(T):
        assert np.array_equal(views[t][2], source[5, t])
    # Uses are counted decayed: expert 1's score was 0.5 a pass ago, now 0.5 * 2**(-1/32) + 1.
    score = np.array(state["score"])
    assert score[1] == pytest.approx(0.5 * 2 ** (-1 / 32) + 1, rel=1e-6)
    assert np.array(state["stamp"]).tolist()[1] == 10


def test_with_lru_the_victim_is_the_least_recently_used(source):
    state, _ = _layer(source, [0, 1, 2, ABSENT, ABSENT, ABSENT], [0, 1, 2], [0.1, 9.0, 9.0, 0, 0, 0], [9, 3, 7, 0, 0, 0])
    slots, counts = _run(host_fetch, [4], state, 10, lru=True)
    assert slots == [1]  # expert 1, used at pass 3, goes (its score does not count)


def test_guesses_load_where_no_other_guess_is_and_count_no_use(source):
    # Slots hold 0, 1, 2; expert 1 is the least used but guessed too, so 4 takes 2's slot.
    state, views = _layer(source, [0, 1, 2, ABSENT, ABSENT, ABSENT], [0, 1, 2], [5.0, 0.5, 1.0, 0, 0, 0], [9] * E)
    slots, counts, loaded = _run(host_fetch, [1, 4], state, 10, guess=True)
    assert (slots, counts, loaded) == ([1, 2], [1, 1, 0], [4])
    for t in range(T):
        assert np.array_equal(views[t][2], source[4, t])
    assert np.array(state["stamp"]).tolist() == [9] * E  # a guess is not a use
    assert np.allclose(np.array(state["score"]), [5.0, 0.5, 1.0, 0, 0, 0])
    # The layer's own call then finds both resident, and counts its uses.
    slots, counts = _run(host_fetch, [4, 1], state, 10)
    assert (slots, counts) == ([2, 1], [0, 0, 0])
    assert np.array(state["stamp"]).tolist()[4] == 10


def test_guesses_that_find_no_slot_are_skipped_not_failed(source):
    state, _ = _layer(source, [0, 1, 2, ABSENT, ABSENT, ABSENT], [0, 1, 2], [0] * E, [9] * E)
    _, counts, loaded = _run(host_fetch, [0, 1, 2, 3, E + 1], state, 10, guess=True)
    assert (counts, loaded) == ([0, 0, 0], [])  # every slot holds a guess; an id out of range is no guess


def test_a_call_with_more_experts_than_slots_is_flagged(source):
    state, _ = _layer(source, [ABSENT] * E, [ABSENT] * S, [0] * E, [0] * E)
    _, counts = _run(host_fetch, [0, 1, 2, 3], state, 1)
    assert counts[2] == 1  # failed: the decode loop refuses such a step
    _, counts = _run(host_fetch, [E + 3], state, 2)
    assert counts[2] == 1


@pytest.mark.parametrize("guess", [0, 1])
def test_the_kernel_compiles_for_a_hopper_gpu(guess):
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC not installed (the test extra installs it on Linux)")
    types = {"score": "float", "src": "uint64_t", "dst": "uint64_t", "nbytes": "uint64_t", "journal": "uint64_t"}
    inputs = [(types.get(n, "uint32_t"), n) for n in fetch_kernels.INPUTS]
    outputs = [("uint32_t", "slots"), ("uint64_t", "plan")]
    consts = [("N", 8), ("S", 64), ("E", 128), ("T", 9), ("LRU", 0), ("HALF", 32), ("MAXC", 72), ("JW", 69),
              ("JSETS", 4), ("GUESS", guess)]
    assert _compile_like_mlx(nvrtc, "fetch", inputs, outputs, consts, fetch_kernels._SOURCE) == ""


def test_the_journal_keeps_a_row_a_pass_and_knows_a_stale_one():
    journal = Journal(2, 8)
    state = {"journal": journal.address(1), "journal_width": journal.width}
    row = journal.rows[1, 7 % 4]
    row[:7] = [7, 2, 1, 0, 2, 5, 9]
    ids, counts = journal.read(1, 7)
    assert ids.tolist() == [5, 9] and counts == [2, 1, 0]
    assert journal.read(1, 11) is None  # the same row, another pass: not this one's record
    assert journal.read(0, 7) is None  # never written
    assert int(np.array(state["journal"])[0]) == journal.device_address + 4 * journal.width * 4


@cuda
@pytest.mark.parametrize("lru", [False, True])
def test_on_cuda_the_kernel_decides_as_the_stand_in_and_copies_from_page_locked_memory(lru):
    """The same calls through the kernel and through the stand-in: the same slots, counts,
    tables and scores; the kernel's copies come from page-locked host memory, as the
    registered shards are."""
    staging = wait_kernels.pinned_alloc(wait_kernels.driver())(E * T * NB)
    src = np.random.default_rng(1).integers(0, 256, size=(E, T, NB), dtype=np.uint8)
    pinned = staging.reshape(E, T, NB)
    pinned[:] = src
    start = ([0, 1, 2, ABSENT, ABSENT, ABSENT], [0, 1, 2], [5.0, 0.5, 1.0, 0, 0, 0], [9, 3, 7, 0, 0, 0])
    dev, dev_views = _layer(pinned, *start, lib=wait_kernels.driver())
    host, host_views = _layer(src, *start)
    for now, ids in enumerate([[1, 5], [3, 4], [0, 5], [2, 1]], start=10):
        got = _run(fetch_experts, ids, dev, now, lru=lru)
        want = _run(host_fetch, ids, host, now, lru=lru)
        assert got == want, now
        for k in ("table", "owner", "stamp"):
            assert np.array(dev[k]).tolist() == np.array(host[k]).tolist(), (now, k)
        assert np.allclose(np.array(dev["score"]), np.array(host["score"]), rtol=1e-6)
    for t in range(T):
        assert np.array_equal(dev_views[t], host_views[t])


@cuda
def test_on_cuda_a_long_run_of_calls_at_q48s_width_decides_as_the_stand_in():
    """128 experts, 64 slots, 40 calls of 8 ids drawn with a skew (as routing is), every other
    one after a call of guesses: every call's slots and counts (and what the guesses loaded),
    and the tables, owners and stamps after it, as the stand-in's."""
    E_, S_ = 128, 64
    rng = np.random.default_rng(2)
    weights = 1.0 / np.arange(1, E_ + 1) ** 1.2
    weights /= weights.sum()
    nb = 16
    src = rng.integers(0, 256, size=(E_, T, nb), dtype=np.uint8)
    pinned = wait_kernels.pinned_alloc(wait_kernels.driver())(src.size).reshape(src.shape)
    pinned[:] = src

    def layer(source, lib=None):
        from chronos_mlx.cache import _numpy_view

        slots = [mx.zeros((S_, nb), dtype=mx.uint8) for _ in range(T)]
        mx.eval(slots)
        views = [_numpy_view(s) for s in slots]
        state = {"table": mx.full((E_,), ABSENT, dtype=mx.uint32), "owner": mx.full((S_,), ABSENT, dtype=mx.uint32),
                 "score": mx.zeros((E_,), dtype=mx.float32), "stamp": mx.zeros((E_,), dtype=mx.uint32),
                 "src": mx.array(np.array([[source[e, t].ctypes.data for t in range(T)] for e in range(E_)],
                                          dtype=np.uint64).reshape(-1)),
                 "dst": mx.array(np.array([v.ctypes.data for v in views], dtype=np.uint64)),
                 "nbytes": mx.array(np.full(T, nb, dtype=np.uint64))}
        mx.eval(list(state.values()))
        return {**state, **_journal_state(Journal(1, 8, lib), Journal(1, 8, lib))}, views

    dev, dev_views = layer(pinned, wait_kernels.driver())
    host, host_views = layer(src)
    for now in range(1, 41):
        if now % 2:  # guesses first on odd passes, as a prefetch for the layer's call
            guesses = rng.choice(E_, size=8, replace=False, p=weights).tolist()
            assert _run(fetch_experts, guesses, dev, now, guess=True) == _run(host_fetch, guesses, host, now, guess=True)
        ids = rng.choice(E_, size=8, replace=False, p=weights).tolist()
        assert _run(fetch_experts, ids, dev, now) == _run(host_fetch, ids, host, now), now
        for k in ("table", "owner", "stamp"):
            assert np.array(dev[k]).tolist() == np.array(host[k]).tolist(), (now, k)
    for t in range(T):
        assert np.array_equal(dev_views[t], host_views[t])
