"""Fuzzing the two file formats chronos reads from users: safetensors headers and profiles.

Random mutations (structured and byte-level). Each either is rejected with the format's
own error (ShardError / ProfileError: one `error:` line in the CLI) or yields a structure
that satisfies every invariant the runtime relies on; never another exception. Mutations
that are accepted are run: the tokens stay stock mlx_lm's (a profile only steers the
cache; an accepted header describes the same tensors).
"""

import json
import os
import random
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

import chronos_mlx
from chronos_mlx.errors import ProfileError, ShardError
from chronos_mlx.shards import DTYPES, ShardIndex, ShardReader

from conftest import DEMO

SEED = 1313
POOL = [None, True, False, -1, 0, 1, 7, 1.5, -0.0, 1e30, 2**63, 2**64 + 3, "8", "", "BF16", "F16", "x" * 300,
        [], [1], [0, 1], [-1, 5], [1, 2, 3], [[1]], {}, {"a": 1}, "../../etc/passwd"]


def _mutate_json(obj, rng: random.Random):
    """One random structural change somewhere inside `obj` (returns the new object)."""
    if rng.random() < 0.05:
        return rng.choice(POOL)
    path, node = [], obj
    while isinstance(node, (dict, list)) and node and rng.random() < 0.75:
        key = rng.choice(list(node.keys())) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    if not path:
        return rng.choice(POOL)
    parent, key = path[-1]
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif op < 0.25 and isinstance(parent, list):
        parent.pop(key)
    elif op < 0.35 and isinstance(node, (int, float)) and not isinstance(node, bool):
        parent[key] = node + rng.choice([-1, 1, 1000, -(10**9)])
    elif op < 0.4:
        parent[key] = [[[[[[node]]]]]]
    else:
        parent[key] = rng.choice(POOL)
    return obj


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    raw = bytearray(raw)
    op = rng.random()
    if op < 0.4 and raw:
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
    elif op < 0.7:
        raw = raw[: rng.randrange(len(raw) + 1)]
    else:
        pos = rng.randrange(len(raw) + 1)
        raw[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(raw)


# --------------------------------------------------------------------------------------
# safetensors headers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-shard")
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "b.scales": rng.standard_normal((2, 5)).astype(np.float16),
        "c.ids": np.arange(7, dtype=np.uint32),
        "d.flag": np.array([True, False]),
    }
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "mlx"})
    return d / "model.safetensors", tensors


def _split(path: Path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, raw[8 : 8 + n], raw[8 + n :]


def _check_accepted(index: ShardIndex, path: Path):
    size = path.stat().st_size
    for t in index.tensors.values():
        count = 1
        for d in t.shape:
            assert isinstance(d, int) and not isinstance(d, bool) and d >= 0
            count *= d
        assert t.nbytes == count * DTYPES[t.dtype][1]
        assert 8 <= t.offset and t.offset + t.nbytes <= size
        assert all(isinstance(v, int) and not isinstance(v, bool) for v in (t.offset, t.nbytes))


def test_fuzzed_headers_are_rejected_cleanly_or_describe_readable_tensors(small_shard, tmp_path):
    src, tensors = small_shard
    n, header_raw, data = _split(src)
    header = json.loads(header_raw)
    rng = random.Random(SEED)
    outcomes = {"rejected": 0, "accepted": 0}
    d = tmp_path / "m"
    d.mkdir()
    target = d / "model.safetensors"
    for i in range(400):
        kind = rng.random()
        if kind < 0.6:  # structured: a field of an entry changed, removed or retyped
            mutated = json.dumps(_mutate_json(json.loads(json.dumps(header)), rng)).encode()
            blob = struct.pack("<Q", len(mutated)) + mutated + data
        elif kind < 0.9:  # bytes of the header text
            mutated = _mutate_bytes(header_raw, rng)
            blob = struct.pack("<Q", len(mutated)) + mutated + data
        else:  # the length prefix or the whole file
            blob = _mutate_bytes(struct.pack("<Q", n) + header_raw + data, rng)
        target.write_bytes(blob)
        try:
            index = ShardIndex.open(d)
        except ShardError:
            outcomes["rejected"] += 1
            continue
        outcomes["accepted"] += 1
        _check_accepted(index, target)
        reader = ShardReader(index)
        for t in index.tensors.values():  # whatever was accepted can be read, within the file
            out = np.empty(t.nbytes, dtype=np.uint8)
            reader.read_into(t.path, t.offset, out)
        reader.close()
    assert outcomes["rejected"] > 300 and outcomes["accepted"] > 0, outcomes


def test_fuzzed_demo_headers_never_give_garbage_tokens(tmp_path):
    """Mutations of the demo model's own header: rejected with one ShardError, or (the few
    that keep the tensor table, e.g. metadata or whitespace changes) the model runs and
    gives stock tokens."""
    from conftest import stock_greedy

    n, header_raw, _ = _split(DEMO / "model.safetensors")
    header = json.loads(header_raw)
    original = {k: v for k, v in header.items() if k != "__metadata__"}
    rng = random.Random(SEED + 1)
    d = tmp_path / "m"
    d.mkdir()
    for f in DEMO.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, d / f.name)
    target = d / "model.safetensors"
    same_table = 0
    for i in range(120):
        if i % 20 == 0:  # harmless: metadata changed, key order shuffled
            h = dict(header)
            h["__metadata__"] = {"format": "mlx", "note": str(i)}
            items = list(h.items())
            rng.shuffle(items)
            mutated = json.dumps(dict(items)).encode()
        else:
            mutated = json.dumps(_mutate_json(json.loads(header_raw), rng)).encode() if i % 2 else _mutate_bytes(header_raw, rng)
        with open(target, "wb") as f:  # header + a sparse data region of the right length
            f.write(struct.pack("<Q", len(mutated)) + mutated)
        os.truncate(target, 8 + len(mutated) + (DEMO / "model.safetensors").stat().st_size - 8 - n)
        try:
            index = ShardIndex.open(d)
        except ShardError:
            continue
        table = {k: (t.dtype, list(t.shape), [t.offset - 8 - len(mutated), t.offset - 8 - len(mutated) + t.nbytes])
                 for k, t in index.tensors.items()}
        assert table == {k: (v["dtype"], v["shape"], v["data_offsets"]) for k, v in original.items()}, (
            "a mutated header was accepted with another tensor table")
        same_table += 1
        if same_table <= 2:  # run it with the real data under the mutated header
            with open(DEMO / "model.safetensors", "rb") as fi, open(target, "r+b") as fo:
                fi.seek(8 + n)
                fo.seek(8 + len(mutated))
                shutil.copyfileobj(fi, fo, 8 << 20)
            from mlx_lm.utils import load_tokenizer

            ids = load_tokenizer(DEMO).encode("The Roman Empire")
            model, tok, rt = chronos_mlx.load(str(d), expert_budget=0.125)
            from chronos_mlx.generate import stream_generate

            got = [r.token for r in stream_generate(model, tok, ids, rt, max_tokens=4)]
            assert got == stock_greedy(DEMO, ids, 4)[0]
    assert same_table >= 3


# --------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------


PROFILE = Path(chronos_mlx.__file__).resolve().parent.parent / "profiles" / "english.json"


def test_fuzzed_profiles_are_rejected_cleanly_or_satisfy_every_invariant(tmp_path):
    from chronos_mlx.cli.profile import heat_rows
    from chronos_mlx.profiles import load_profile

    raw = PROFILE.read_bytes()
    data = json.loads(raw)
    rng = random.Random(SEED + 2)
    path = tmp_path / "fuzzed.json"
    accepted = rejected = 0
    for i in range(300):
        if rng.random() < 0.7:
            text = json.dumps(_mutate_json(json.loads(raw), rng)).encode()
        else:
            text = _mutate_bytes(raw, rng)
        path.write_bytes(text)
        try:
            p = load_profile(path)
        except ProfileError:
            rejected += 1
            continue
        accepted += 1
        k, (L, E) = p.top_k, p.counts.shape
        assert p.tokens.dtype == np.int64 and (p.counts >= 0).all() and (p.tokens >= 0).all()
        assert (p.counts.sum(axis=1) == p.tokens * k).all()
        assert p.coactivation.shape == (L, E, E) and 1 <= k <= E
        assert np.isfinite(p.frequencies()).all()
        heat_rows(p.frequencies(), 40)  # `profile show` draws it
        for layer in range(L):
            assert len(p.hot(layer, 4)) == min(4, E)
    assert rejected > 200 and accepted >= 1, (accepted, rejected)


def test_accepted_fuzzed_profiles_never_change_the_tokens(tmp_path):
    """A profile only steers the cache (policy seed, pre-warm): whatever mutated profile is
    accepted, the tokens are stock mlx_lm's."""
    from conftest import stock_greedy
    from mlx_lm.utils import load_tokenizer

    from chronos_mlx.generate import stream_generate
    from chronos_mlx.profiles import apply_profile, load_profile

    data = json.loads(PROFILE.read_bytes())
    rng = random.Random(SEED + 3)
    ids = load_tokenizer(DEMO).encode("The Roman Empire")
    want = stock_greedy(DEMO, ids, 5)[0]
    model, tok, rt = chronos_mlx.load(None, expert_budget=0.125, policy="usage")
    base = load_profile(PROFILE)
    candidates = []
    for i in range(2):  # valid but wrong: the experts' statistics shuffled (steers the cache elsewhere)
        perms = [np.random.default_rng(i).permutation(base.num_experts) for _ in range(base.num_layers)]
        candidates.append(base.permuted(perms, base.fingerprint))
    for i in range(200):  # fuzzed files that are accepted
        path = tmp_path / f"p{i}.json"
        path.write_text(json.dumps(_mutate_json(json.loads(json.dumps(data)), rng)))
        try:
            candidates.append(load_profile(path))
        except ProfileError:
            continue
        if len(candidates) >= 4:
            break
    assert len(candidates) >= 3
    for prof in candidates:
        try:
            thread = apply_profile(rt, model, prof)
        except ProfileError:  # accepted as a file, refused for this model (fingerprint)
            continue
        thread.join()
        got = [r.token for r in stream_generate(model, tok, ids, rt, max_tokens=5)]
        assert got == want
