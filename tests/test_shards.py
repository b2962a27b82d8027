"""ShardIndex validates shard headers like the safetensors reader; ShardReader reads exact bytes."""

import json
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from chronos_mlx import lio
from chronos_mlx.errors import ShardError
from chronos_mlx.io import SimulatedSSD
from chronos_mlx.layout import locate_expert_tensor
from chronos_mlx.shards import ShardIndex, ShardReader

from conftest import DEMO


def _write_shard(path, tensors):
    save_file(tensors, str(path))
    return path


@pytest.fixture()
def shard_dir(tmp_path):
    rng = np.random.default_rng(0)
    _write_shard(
        tmp_path / "model.safetensors",
        {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": np.arange(10, dtype=np.uint32)},
    )
    return tmp_path


def test_index_knows_every_tensor_of_the_demo_model():
    index = ShardIndex.open(DEMO)
    info = index["model.layers.3.mlp.switch_mlp.up_proj.weight"]
    assert info.dtype == "U32" and info.shape == (64, 128, 48)
    assert info.nbytes == 64 * 128 * 48 * 4


def test_reader_reads_one_expert_exactly(tmp_path):
    index = ShardIndex.open(DEMO)
    name = "model.layers.5.mlp.switch_mlp.down_proj.weight"
    expert = locate_expert_tensor(index, {}, name, 64, (384, 16))
    out = np.empty((384, 16), dtype=np.uint32)
    reader = ShardReader(index)
    s = expert.slices[17]
    reader.read_into(s.path, s.offset, out)
    truth = np.array(mx.load(str(DEMO / "model.safetensors"))[name][17])
    assert np.array_equal(out, truth)
    assert reader.bytes_read == out.nbytes


def test_a_batch_reads_adjacent_ranges_with_one_call_into_separate_buffers():
    index = ShardIndex.open(DEMO)
    name = "model.layers.5.mlp.switch_mlp.down_proj.weight"
    expert = locate_expert_tensor(index, {}, name, 64, (384, 16))
    truth = np.array(mx.load(str(DEMO / "model.safetensors"))[name])
    outs = {e: np.empty((384, 16), dtype=np.uint32) for e in (9, 3, 4, 5)}
    reader = ShardReader(index)
    done = reader.read_batch([(expert.slices[e].path, expert.slices[e].offset, out) for e, out in outs.items()])
    for e, out in outs.items():
        assert np.array_equal(out, truth[e])
    assert reader.read_calls == 2  # experts 3, 4, 5 touch on disk: one preadv; 9 alone
    assert reader.bytes_read == 4 * outs[9].nbytes
    assert len(done) == 4 and all(isinstance(t, float) for t in done)


def _watched_reader(name: str, threads: int, min_bytes: int):
    """A reader of the demo that records which threads read which groups: (reader, index,
    the tensor's experts, its stock values, thread names, groups). Python threads only (no
    lio_listio): the path taken where that is not available."""
    import threading

    index = ShardIndex.open(DEMO)
    expert = locate_expert_tensor(index, {}, name, 64, (128, 48))
    truth = np.array(mx.load(str(DEMO / "model.safetensors"))[name])
    reader = ShardReader(index)
    reader.threads, reader.min_bytes_per_thread = threads, min_bytes
    reader.lio = False  # what load(split_reads="threads") sets
    seen, groups = set(), []
    read_group = reader._read_group
    reader._read_group = lambda group: (seen.add(threading.current_thread().name), groups.append(group), read_group(group))
    return reader, index, expert, truth, seen, groups


def test_a_large_batch_is_read_by_several_threads_with_the_same_bytes():
    import threading

    # min_bytes 1: every batch is big enough to split
    reader, index, expert, truth, seen, groups = _watched_reader("model.layers.2.mlp.switch_mlp.gate_proj.weight", 4, 1)
    outs = {e: np.empty((128, 48), dtype=np.uint32) for e in range(0, 64, 2)}  # none adjacent
    reader.read_batch([(expert.slices[e].path, expert.slices[e].offset, out) for e, out in outs.items()])
    for e, out in outs.items():
        assert np.array_equal(out, truth[e])
    assert len(groups) == 4 and len(seen) >= 2  # four groups, on the caller and reader threads
    assert sorted(r.offset for g in groups for r, _ in g) == sorted(expert.slices[e].offset for e in outs)
    small = ShardReader(index)  # default threshold: a few small experts stay on the caller
    small._read_group = lambda group: (seen.add("small-" + threading.current_thread().name), None)
    small.read_batch([(expert.slices[e].path, expert.slices[e].offset, outs[e]) for e in (0, 2)])
    assert {n for n in seen if n.startswith("small-")} == {"small-" + threading.current_thread().name}


def test_one_long_run_is_cut_so_that_several_threads_read_it():
    # Experts adjacent on disk are one run; one expert's big tensors too. Cut into pieces,
    # it spreads over the reader threads instead of capping the batch at one per run.
    reader, _, expert, truth, seen, groups = _watched_reader("model.layers.5.mlp.switch_mlp.up_proj.weight", 4, 128 << 10)
    out = np.empty((64, 128, 48), dtype=np.uint32)  # all 64 experts: one 1.5 MB run
    reader.read_batch([(expert.slices[e].path, expert.slices[e].offset, out[e]) for e in range(64)])
    assert np.array_equal(out, truth)
    assert reader.read_calls == 1  # counted as the one run it is
    pieces = [r for g in groups for r, _ in g]
    assert len(pieces) == 12 and len(seen) >= 2
    assert sum(r.nbytes for r in pieces) == out.nbytes


@pytest.mark.skipif(not lio.available(), reason="lio_listio: Linux glibc only")
def test_where_lio_listio_runs_a_split_batch_is_one_call_over_one_descriptor_a_group(monkeypatch):
    name = "model.layers.2.mlp.switch_mlp.gate_proj.weight"
    index = ShardIndex.open(DEMO)
    expert = locate_expert_tensor(index, {}, name, 64, (128, 48))
    truth = np.array(mx.load(str(DEMO / "model.safetensors"))[name])
    reader = ShardReader(index)
    reader.threads, reader.min_bytes_per_thread = 4, 1
    calls = []
    real = lio.read_pieces
    monkeypatch.setattr(lio, "read_pieces", lambda pieces: (calls.append(pieces), real(pieces))[1])
    reader._read_group = lambda group: pytest.fail("no Python reader thread when lio_listio runs")
    outs = {e: np.empty((128, 48), dtype=np.uint32) for e in range(0, 64, 2)}
    reader.read_batch([(expert.slices[e].path, expert.slices[e].offset, out) for e, out in outs.items()])
    for e, out in outs.items():
        assert np.array_equal(out, truth[e])
    assert len(calls) == 1 and len({fd for fd, _, _ in calls[0]}) == 4  # four groups in flight


@pytest.mark.skipif(not lio.available(), reason="lio_listio: Linux glibc only")
def test_a_range_past_the_end_of_a_shard_is_a_clear_error_through_lio_listio_too(shard_dir):
    from chronos_mlx.shards import ReadRun

    path = shard_dir / "model.safetensors"
    reader = ShardReader(ShardIndex.open(shard_dir))
    reader._fd(path)
    size = path.stat().st_size
    inside, past = bytearray(8), bytearray(64)
    groups = [[(ReadRun(path, 0, [memoryview(inside)], 8), None)],
              [(ReadRun(path, size - 16, [memoryview(past)], 64), None)]]
    with pytest.raises(ShardError, match="read past end of file"):
        reader._read_lio(groups)
    assert bytes(inside) == path.read_bytes()[:8]


def test_the_split_read_path_is_named_for_the_user(monkeypatch):
    from chronos_mlx.shards import split_read_path

    monkeypatch.setenv("CHRONOS_READ_THREADS", "1")
    assert split_read_path().startswith("one thread")
    monkeypatch.setenv("CHRONOS_READ_THREADS", "4")
    assert ("lio_listio" in split_read_path()) == lio.available()
    monkeypatch.setattr(lio, "available", lambda: False)
    assert split_read_path() == "up to 4 Python reader threads"


def test_read_threads_follow_the_cores_unless_the_environment_sets_them(monkeypatch):
    from chronos_mlx.shards import default_read_threads

    monkeypatch.delenv("CHRONOS_READ_THREADS", raising=False)
    assert 1 <= default_read_threads() <= 8
    monkeypatch.setenv("CHRONOS_READ_THREADS", "1")
    assert ShardReader(ShardIndex.open(DEMO)).threads == 1  # every batch on the calling thread
    monkeypatch.setenv("CHRONOS_READ_THREADS", "many")
    with pytest.raises(ValueError, match="CHRONOS_READ_THREADS"):
        default_read_threads()


def test_simulated_ssd_overlaps_the_latency_of_a_batch_and_queues_its_bytes():
    ssd = SimulatedSSD(bandwidth=1e9, latency=100e-6)
    done = ssd.schedule([1_000_000, 2_000_000], started=10.0)
    assert done == pytest.approx([10.0 + 1e-3 + 1e-4, 10.0 + 3e-3 + 1e-4])  # one latency each, not summed
    later = ssd.schedule([1_000_000], started=10.0)  # submitted meanwhile: waits for the bus
    assert later == pytest.approx([10.0 + 4e-3 + 1e-4])


def test_readahead_hint_never_fails(shard_dir):
    import os

    from chronos_mlx.shards import advise_willneed

    fd = os.open(ShardIndex.open(shard_dir)["b"].path, os.O_RDONLY)
    try:
        advise_willneed(fd, 0, 1 << 20)  # past the end too: a hint, never an error
    finally:
        os.close(fd)
    advise_willneed(-1, 0, 10)  # a bad descriptor is ignored as well


def test_direct_io_reads_the_same_bytes_and_reports_whether_it_took_effect(shard_dir):
    index = ShardIndex.open(shard_dir)
    info = index["b"]
    plain, direct = np.empty(10, np.uint32), np.empty(10, np.uint32)
    ShardReader(index).read_into(info.path, info.offset, plain)
    reader = ShardReader(index, direct=True)
    reader.read_into(info.path, info.offset, direct)
    assert np.array_equal(plain, direct) and np.array_equal(plain, np.arange(10))
    assert isinstance(reader.direct_io_active, bool)


def test_truncated_shard_is_an_error_naming_the_file(shard_dir):
    path = shard_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ShardError, match="model.safetensors.*truncated"):
        ShardIndex.open(shard_dir)


def test_header_that_is_not_json_is_an_error(shard_dir):
    path = shard_dir / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(ShardError, match="not UTF-8 JSON"):
        ShardIndex.open(shard_dir)


def test_header_length_beyond_the_file_is_an_error(shard_dir):
    path = shard_dir / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ShardError, match="header length"):
        ShardIndex.open(shard_dir)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_offsets_out_of_range_are_an_error_naming_the_tensor(shard_dir):
    path = shard_dir / "model.safetensors"
    _rewrite_header(path, lambda h: h["b"].update(data_offsets=[h["b"]["data_offsets"][0] + 8, h["b"]["data_offsets"][1] + 8]))
    with pytest.raises(ShardError, match="'b'"):
        ShardIndex.open(shard_dir)


def test_shape_that_disagrees_with_the_byte_size_is_an_error(shard_dir):
    path = shard_dir / "model.safetensors"
    _rewrite_header(path, lambda h: h["a"].update(shape=[5, 3]))
    with pytest.raises(ShardError, match="tensor 'a' holds 48 bytes"):
        ShardIndex.open(shard_dir)


def test_shard_named_in_the_index_but_missing_is_an_error(tmp_path):
    shutil.copy(DEMO / "model.safetensors.index.json", tmp_path)
    with pytest.raises(ShardError, match="missing: model.safetensors"):
        ShardIndex.open(tmp_path)


def test_expert_shape_that_disagrees_with_config_is_an_error():
    index = ShardIndex.open(DEMO)
    with pytest.raises(ShardError, match="config.json implies"):
        locate_expert_tensor(index, {}, "model.layers.0.mlp.switch_mlp.up_proj.weight", 64, (256, 48))


def test_a_shard_that_changes_while_in_use_is_never_read_as_zeros(shard_dir):
    index = ShardIndex.open(shard_dir)
    reader = ShardReader(index)
    info = index["a"]
    path = shard_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ShardError, match="changed size"):
        reader.read_into(info.path, info.offset, np.empty((4, 3), np.float32))
