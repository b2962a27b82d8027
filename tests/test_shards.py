"""ShardIndex validates shard headers like the safetensors reader; ShardReader reads exact bytes."""

import json
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from chronos_mlx.errors import ShardError
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
