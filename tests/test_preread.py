"""Guessed experts read into staging ahead of the request that needs them (preread.py).

The pre-reader reads whole experts (every parameter, 16-byte aligned) from the real shards on a
thread of its own; a demand load `take`s one and lists copies from it. It never touches the
cache's slots: these tests check the bytes, the buffers' lifetimes and failures. Tokens under
device-wait with staged guesses are compared with stock mlx_lm in tests/test_device_wait.py.
"""

import numpy as np
import pytest

import chronos_mlx
from chronos_mlx.errors import ShardError
from chronos_mlx.io import SimulatedSSD
from chronos_mlx.preread import ALIGN, PreReader, expert_layout


@pytest.fixture(scope="module")
def cache():
    _, _, runtime = chronos_mlx.load(None, expert_budget=0.25)
    return runtime.cache


def _alloc(n):
    return np.zeros(n, dtype=np.uint8)


def _absent(cache, layer, n):
    L = cache.layers[layer]
    return [e for e in range(L.num_experts) if L.slot_of[e] < 0][:n]


def _shard_bytes(cache, layer, expert, name):
    p = cache.layers[layer].params[name]
    out = np.empty(p.source.nbytes, dtype=np.uint8)
    cache.reader.pread(p.paths[expert], p.offsets[expert], out)
    return out


def test_an_expert_is_staged_whole_with_each_parameter_aligned_for_the_device(cache):
    offsets, nbytes = expert_layout(cache.layers[0].params)
    assert all(at % ALIGN == 0 for at in offsets.values())
    assert nbytes >= sum(p.source.nbytes for p in cache.layers[0].params.values())


def test_a_staged_expert_holds_its_bytes_from_the_shards(cache):
    pre = PreReader(cache, _alloc, capacity=4)
    try:
        layer, (e,) = 2, _absent(cache, 2, 1)
        assert pre.submit(layer, [e]) == 1
        s = pre.take(layer, e)
        assert s is not None and s.error is None
        for name, at in pre.offsets(layer).items():
            n = cache.layers[layer].params[name].source.nbytes
            assert np.array_equal(s.buf[at : at + n], _shard_bytes(cache, layer, e, name))
        assert pre.take(layer, e) is None  # taken once
        assert (pre.reads, pre.used) == (1, 1)
    finally:
        pre.stop()


def test_resident_and_already_staged_experts_are_not_read_again(cache):
    pre = PreReader(cache, _alloc, capacity=8)
    try:
        L = cache.layers[1]
        resident = [e for e in range(L.num_experts) if L.slot_of[e] >= 0][:2]
        absent = _absent(cache, 1, 2)
        assert pre.submit(1, resident + absent) == 2
        assert pre.submit(1, absent) == 0
    finally:
        pre.stop()


def test_the_oldest_staged_expert_makes_room_and_its_bytes_count_as_wasted(cache):
    pre = PreReader(cache, _alloc, capacity=2)
    try:
        a, b, c = _absent(cache, 3, 3)
        read_before = cache.layers[3].counters.bytes_read
        assert pre.submit(3, [a, b]) == 2
        pre.take(3, b)  # held: its copies may be pending
        pre.recycle()
        assert pre.submit(3, [c]) == 1  # takes b's buffer, now free again
        assert pre.wasted == 0
        d = _absent(cache, 3, 4)[3]
        pre.take(3, c)
        pre._staged[(3, a)].done.wait()
        assert pre.submit(3, [d]) == 1  # a was never used: its buffer goes to d
        assert pre.wasted == 1
        assert pre.take(3, a) is None
        assert cache.layers[3].counters.bytes_read - read_before == cache.bytes_on_disk_per_expert
    finally:
        pre.stop()


def test_a_buffer_taken_by_a_load_is_not_reused_until_recycled(cache):
    pre = PreReader(cache, _alloc, capacity=1)
    try:
        a, b = _absent(cache, 4, 2)
        assert pre.submit(4, [a]) == 1
        s = pre.take(4, a)
        assert pre.submit(4, [b]) == 0  # the only buffer is held
        pre.recycle()
        assert pre.submit(4, [b]) == 1
        assert pre.take(4, b).buf.ctypes.data == s.buf.ctypes.data
    finally:
        pre.stop()


def test_a_failed_read_is_not_handed_out_the_load_reads_it_itself(cache, monkeypatch):
    pre = PreReader(cache, _alloc, capacity=2)
    try:
        def gone(runs, checked=False):
            raise ShardError("the drive went away")

        monkeypatch.setattr(cache.reader, "read_runs", gone)
        (e,) = _absent(cache, 5, 1)
        assert pre.submit(5, [e]) == 1
        assert pre.take(5, e) is None
        assert pre.reads == 0
    finally:
        pre.stop()


def test_under_a_simulated_drive_a_staged_expert_arrives_when_the_drive_would_deliver_it(cache, monkeypatch):
    monkeypatch.setattr(cache.reader, "simulator", SimulatedSSD(bandwidth=1e6, latency=0.0))  # 1 MB/s
    pre = PreReader(cache, _alloc, capacity=1)
    try:
        (e,) = _absent(cache, 6, 1)
        import time

        t0 = time.perf_counter()
        pre.submit(6, [e])
        s = pre.take(6, e)
        assert s.ready - t0 >= 0.9 * cache.bytes_on_disk_per_expert / 1e6
    finally:
        pre.stop()
