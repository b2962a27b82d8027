"""`chronos pack`: experts that fire together become adjacent on disk, the router rows move with
them, stock mlx_lm gives the same tokens from the packed checkpoint, and adjacent experts can
be read with one call."""

import json

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx import pack as K
from chronos_mlx import profiles as P
from chronos_mlx.errors import ModelError, ProfileError
from chronos_mlx.generate import generate_step
from chronos_mlx.layout import ExpertSlice, ExpertTensor
from synthetic import write_synthetic_moe

from conftest import DEMO, stock_greedy

PROMPT_IDS = [5, 77, 301, 12, 999, 42, 7, 3000, 15, 88]


def _planted(num_experts=16, blocks=4, seed=0):
    """Co-activation of experts that fire in fixed groups {0,4,8,12}, {1,5,9,13}, ..."""
    rng = np.random.default_rng(seed)
    co = np.zeros((num_experts, num_experts), dtype=np.int64)
    for g in range(blocks):
        members = np.arange(g, num_experts, blocks)
        co[np.ix_(members, members)] += rng.integers(50, 100)
    co += rng.integers(0, 3, size=co.shape)
    co = np.triu(co, 1) + np.triu(co, 1).T
    counts = co.sum(axis=1)
    return co, counts


def test_order_is_a_permutation_that_makes_each_cluster_contiguous():
    co, counts = _planted()
    perm, clusters = K.expert_order(co, counts, seed=0)
    assert sorted(perm.tolist()) == list(range(16))
    assert [b - a for a, b in clusters] == [4, 4, 4, 4]
    for a, b in clusters:  # every cluster is one planted group: same residue mod 4
        assert len({int(e) % 4 for e in perm[a:b]}) == 1
    again, _ = K.expert_order(co, counts, seed=0)
    np.testing.assert_array_equal(perm, again)  # seeded: reproducible


def test_grouped_routing_keeps_experts_inside_their_group():
    co, counts = _planted()
    perm, _ = K.expert_order(co, counts, seed=0, groups=2)
    assert sorted(perm[:8].tolist()) == list(range(8)) and sorted(perm[8:].tolist()) == list(range(8, 16))
    assert K.routing_groups({"model_type": "deepseek_v3", "n_group": 8}) == 8
    assert K.routing_groups({"model_type": "deepseek_v2", "n_group": 8, "topk_method": "greedy"}) == 1
    assert K.routing_groups({"model_type": "qwen3_moe"}) == 1


def _record(path, prompts, max_tokens=6):
    model, tokenizer, runtime = chronos_mlx.load(path, expert_budget=1.0)
    return P.record_profile(model, tokenizer, runtime, prompts, name="work", max_tokens=max_tokens)


CASES = [
    ("qwen3_moe", "stacked", 4),  # quantized router: weight, scales, biases
    ("gpt_oss", "stacked", 4),  # router with a bias
    ("mixtral", "stacked", None),  # plain float router
    ("deepseek_v2", "per-expert", 4),  # one tensor per expert; MoEGate router
]


@pytest.mark.parametrize("model_type,layout,bits", CASES)
def test_packed_synthetic_model_gives_stock_mlx_lm_tokens(tmp_path, model_type, layout, bits):
    src = write_synthetic_moe(tmp_path / "src", model_type, layout=layout, bits=bits, seed=4)
    profile = _record(src, [PROMPT_IDS, PROMPT_IDS[::-1]])
    result = K.pack(src, profile, tmp_path / "packed", seed=0)
    assert any((p != np.arange(len(p))).any() for p in result.permutations)
    ref, ref_lp = stock_greedy(src, PROMPT_IDS, 12)
    got, got_lp = stock_greedy(result.out_dir, PROMPT_IDS, 12)
    assert got == ref
    for a, b in zip(ref_lp, got_lp):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_packed_demo_model_same_tokens_router_rows_moved_and_profile_translated(tmp_path, demo_prompt_ids):
    profile = _record(DEMO, [demo_prompt_ids], max_tokens=8)
    out = tmp_path / "packed"
    result = K.pack(None, profile, out, seed=0)
    sidecar = json.loads((out / "chronos-pack.json").read_text())
    perms = [np.array(layer["permutation"]) for layer in sidecar["layers"]]
    assert len(perms) == 8 and all(sorted(p.tolist()) == list(range(64)) for p in perms)
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()

    # The router's rows and the experts moved together.
    src_w, new_w = mx.load(str(DEMO / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    for name in ("mlp.gate.weight", "mlp.gate.scales", "mlp.switch_mlp.down_proj.weight"):
        key = f"model.layers.3.{name}"
        a, b = (mx.view(w[key], mx.uint16) if w[key].dtype == mx.bfloat16 else w[key] for w in (new_w, src_w))
        np.testing.assert_array_equal(np.array(a), np.array(b)[perms[3]])

    ref, _ = stock_greedy(DEMO, demo_prompt_ids, 16)
    assert stock_greedy(out, demo_prompt_ids, 16)[0] == ref

    # The original profile is refused on the packed model; the translated one applies.
    model, _, runtime = chronos_mlx.load(out, expert_budget=0.25, policy="usage")
    with pytest.raises(ProfileError, match="router weights differ"):
        P.apply_profile(runtime, model, profile)
    translated = P.load_profile(str(result.profile_path))
    np.testing.assert_array_equal(translated.counts[3], profile.counts[3][perms[3]])
    P.apply_profile(runtime, model, translated).join()
    ids = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=16)]
    assert ids == ref


def test_pack_refuses_to_overwrite_or_to_pack_in_place(tmp_path):
    src = write_synthetic_moe(tmp_path / "src", "qwen3_moe", bits=4, seed=4)
    profile = _record(src, [PROMPT_IDS])
    with pytest.raises(ModelError, match="must not be the model itself"):
        K.pack(src, profile, src)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(ModelError, match="not empty"):
        K.pack(src, profile, tmp_path / "busy")
    other = write_synthetic_moe(tmp_path / "other", "qwen3_moe", bits=4, seed=5)
    with pytest.raises(ProfileError, match="router weights differ"):
        K.pack(other, profile, tmp_path / "out")


def _tensor(num_experts=8, nbytes=100, path="shard"):
    return ExpertTensor("w", "U8", (nbytes,), [ExpertSlice(path, 1000 + e * nbytes, nbytes) for e in range(num_experts)])


def test_adjacent_experts_are_counted_as_one_read():
    layers = [[_tensor(), _tensor(path="other")]]  # two parameters, in two shards
    loads = [(0, [2, 3, 4]), (0, [0, 6]), (0, [7])]
    reads = K.count_reads(loads, layers)
    assert reads["calls_per_expert"] == 2 * 6
    assert reads["calls_merged"] == 2 * (1 + 2 + 1)
    assert reads["bytes"] == 2 * 6 * 100 and reads["bytes_per_call_merged"] == 1200 / 8
    # A layout with 0 and 6 side by side (positions 5, 6) turns the second load into one read.
    perm = np.array([1, 2, 3, 4, 5, 0, 6, 7])  # position i holds expert perm[i]
    packed = [(layer, np.argsort(perm)[experts]) for layer, experts in loads]
    assert K.count_reads(packed, layers)["calls_merged"] == 2 * (1 + 1 + 1)
