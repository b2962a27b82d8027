"""A checkpoint puts any mlx-lm cache back exactly as it was before a step.

Each case drives two identical caches through the same history; one of them also takes a
wrong step that is then rolled back. From then on both must hold the same state and
return the same keys/values (or arrays) for the same updates: the reference is mlx_lm's
own cache that never saw the wrong step.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    ChunkedKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)

from chronos_mlx.resume import kept_caches, resume_point
from chronos_mlx.rollback import Checkpoint, RollbackError, checkpointable, leaves


def kv(seed, n=1):
    rng = np.random.default_rng(seed)
    return tuple(mx.array(rng.standard_normal((1, 2, n, 64)).astype(np.float32)) for _ in range(2))


def attention_update(cache, seed, n=1):
    if hasattr(cache, "maybe_trim_front"):  # what llama4 does before its layers
        cache.maybe_trim_front()
    return cache.update_and_fetch(*kv(seed, n))


def arrays_update(cache, seed, n=1):
    rng = np.random.default_rng(seed)
    conv = mx.array(rng.standard_normal((1, 3, 8)).astype(np.float32))
    state = mx.array(rng.standard_normal((1, 4, 8)).astype(np.float32))
    cache[0] = conv if cache[0] is None else mx.concatenate([cache[0][:, 1:], conv[:, :1]], axis=1)
    cache[1] = state if cache[1] is None else cache[1] * 0.5 + state
    return cache[0], cache[1]


def list_update(cache, seed, n=1):
    return attention_update(cache[0], seed, n) + arrays_update(cache[1], seed + 1, n)


CASES = {
    "KVCache": (KVCache, attention_update),
    "QuantizedKVCache": (lambda: QuantizedKVCache(group_size=32, bits=8), attention_update),
    "RotatingKVCache wrapped": (lambda: RotatingKVCache(max_size=8), attention_update),
    "RotatingKVCache keep": (lambda: RotatingKVCache(max_size=8, keep=2), attention_update),
    "ChunkedKVCache across a front trim": (lambda: ChunkedKVCache(chunk_size=8), attention_update),
    "ArraysCache": (lambda: ArraysCache(2), arrays_update),
    "CacheList": (lambda: CacheList(KVCache(), ArraysCache(2)), list_update),
}


def as_numpy(out):
    return [np.array(a) for a in (out if isinstance(out, tuple) else (out,)) if isinstance(a, mx.array)]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("prompt_len", [5, 11])
def test_a_rolled_back_step_leaves_no_trace(name, prompt_len):
    make, update = CASES[name]
    ours, reference = make(), make()
    for cache in (ours, reference):
        update(cache, 0, prompt_len)  # prefill
    for t in range(1, 14):  # decode: wraps the windows, trims the chunk's front
        checkpoint = Checkpoint([ours])
        update(ours, 1000 + t)  # a wrong step ...
        mx.eval([c.state for c in leaves([ours])])
        checkpoint.restore()  # ... undone
        got, want = update(ours, t), update(reference, t)
        for a, b in zip(as_numpy(got), as_numpy(want)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(CASES))
def test_two_steps_rolled_back_in_turn_leave_no_trace(name):
    # The decode loop runs a step ahead: when step p missed, step p + 1 (launched on p's
    # token) is undone first, then p. A wrapped window's p + 1 overwrote an entry that the
    # recomputation of p still attends to, so trimming alone would not do.
    make, update = CASES[name]
    ours, reference = make(), make()
    for cache in (ours, reference):
        update(cache, 0, 9)
    for t in range(1, 12, 2):
        first = Checkpoint([ours])
        update(ours, 1000 + t)
        ahead = Checkpoint([ours])
        update(ours, 2000 + t)
        ahead.restore()
        first.restore()
        for s in (t, t + 1):
            got, want = update(ours, s), update(reference, s)
            for a, b in zip(as_numpy(got), as_numpy(want)):
                np.testing.assert_array_equal(a, b)


def test_a_step_that_only_appends_is_undone_by_trimming():
    cache = KVCache()
    attention_update(cache, 0, 4)
    checkpoint = Checkpoint([cache])
    keys_before = cache.keys
    attention_update(cache, 1)
    checkpoint.restore()
    assert cache.offset == 4 and cache.keys is keys_before  # trimmed in place, nothing copied


def test_a_checkpoint_can_keep_chosen_caches():
    a, b = KVCache(), KVCache()
    checkpoint = Checkpoint([a, b])
    attention_update(a, 1)
    attention_update(b, 2)
    checkpoint.restore(keep={id(a)})
    assert (a.offset, b.offset) == (1, 0)


def test_a_cache_that_changed_more_than_it_appended_is_an_error_not_a_wrong_token():
    cache = ChunkedKVCache(chunk_size=4)
    attention_update(cache, 0, 4)
    checkpoint = Checkpoint([cache])  # appends only: offset - start <= chunk
    attention_update(cache, 1)
    cache.start_position += 1  # something a trim cannot undo
    with pytest.raises(RollbackError):
        checkpoint.restore()


def test_model_specific_caches_are_restored_by_their_attributes():
    class WindowCache:  # like deepseek_v41's LayerCache: not trimmable, arrays rebound
        def __init__(self):
            self.offset, self.window = 0, None

        def is_trimmable(self):
            return False

        def update(self, x):
            self.window = x if self.window is None else mx.concatenate([self.window, x])[-3:]
            self.offset += 1

    cache = WindowCache()
    cache.update(mx.array([1.0]))
    checkpoint = Checkpoint([cache])
    cache.update(mx.array([2.0]))
    checkpoint.restore()
    assert cache.offset == 1 and cache.window.tolist() == [1.0]


def test_objects_without_attributes_cannot_be_checkpointed():
    assert checkpointable([KVCache(), ArraysCache(1)])
    assert not checkpointable([(1, 2)])


def test_resume_starts_below_a_cache_shared_with_an_earlier_layer():
    # layers 0..3; layers 2 and 3 share cache "b" (like KV shared between layer pairs)
    touched = {0: {"a"}, 1: {"c"}, 2: {"b"}, 3: {"b"}}
    assert resume_point(3, touched) == 2
    assert resume_point(1, touched) == 1
    assert kept_caches(2, touched) == {"a", "c"}
    # replayed layers were given no cache in that attempt
    assert resume_point(3, {0: set(), 1: set(), 2: {"b"}, 3: {"b"}}) == 2
