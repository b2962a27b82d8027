"""Routing traces: recorded from the model itself, exact, deterministic, saved and loaded intact."""

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from synthetic import write_synthetic_moe
from chronos_mlx.traces import (
    RoutingTrace,
    TraceError,
    find_routers,
    model_fingerprint,
    moe_modules,
    record_traces,
)

PROMPTS = ["The history of the Roman Empire begins", [5, 17, 301, 44, 9, 1200, 77]]
N = 5


def _stock(path):
    from mlx_lm import load

    model, tok = load(str(path))
    model.set_dtype(mx.float32)
    return model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_synthetic_moe(tmp_path_factory.mktemp("traces") / "q", "qwen3_moe", bits=4, seed=11)
    model, tok = _stock(path)
    return path, model, tok, record_traces(model, tok, PROMPTS, max_tokens=N, stop_at_eos=False)


def test_shapes_positions_and_tokens_match_stock_generation(tiny):
    from mlx_lm.generate import generate_step

    path, model, tok, trace = tiny
    L = len(moe_modules(model))
    assert (trace.num_layers, trace.num_experts, trace.top_k, trace.hidden_size) == (L, 8, 2, 128)
    for prompt, seq in zip(PROMPTS, trace.sequences):
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
        ref = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=N)]
        assert seq.tokens.tolist() == list(ids) + ref
        assert seq.n_prompt == len(ids) and seq.length == len(ids) + N
        assert seq.experts.shape == (L, seq.length, 2) and seq.hidden.shape == (L, seq.length, 128)
        assert seq.hidden.dtype == np.float16 and seq.generated.sum() == N
        assert seq.experts.min() >= 0 and seq.experts.max() < 8


def test_recorded_experts_are_the_routers_choice_on_the_recorded_input(tiny):
    _, model, _, trace = tiny
    routers = find_routers(model)
    seq = trace.sequences[0]
    for layer, r in enumerate(routers):
        x = mx.array(seq.hidden[layer].astype(np.float32))
        logits = np.array(r.logits(x))
        top = np.sort(np.argsort(-logits, axis=-1)[:, :2], axis=-1)
        agree = (top == np.sort(seq.experts[layer], axis=-1)).all(-1).mean()
        assert agree > 0.95  # float16 storage of x may flip a near tie


def test_model_is_unchanged_and_recording_is_deterministic(tiny):
    _, model, tok, trace = tiny
    assert not any(type(m).__name__ == "_Recorder" for _, m in model.named_modules())
    again = record_traces(model, tok, PROMPTS, max_tokens=N, stop_at_eos=False)
    for a, b in zip(trace.sequences, again.sequences):
        assert np.array_equal(a.experts, b.experts) and np.array_equal(a.hidden, b.hidden)


def test_chronos_model_records_the_same_trace_and_fingerprint(tiny):
    path, model, tok, trace = tiny
    cm, ctok, runtime = chronos_mlx.load(path, expert_budget=0.5)
    ct = record_traces(cm, ctok, PROMPTS, max_tokens=N, stop_at_eos=False)
    for a, b in zip(trace.sequences, ct.sequences):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.experts, b.experts)
    assert ct.fingerprint == trace.fingerprint == model_fingerprint(model)


def test_save_load_round_trip_and_corrupt_file(tiny, tmp_path):
    trace = tiny[3]
    p = trace.save(tmp_path / "t.npz")
    back = RoutingTrace.load(p)
    assert back.fingerprint == trace.fingerprint and back.top_k == trace.top_k
    for a, b in zip(trace.sequences, back.sequences):
        assert a.n_prompt == b.n_prompt
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.experts, b.experts)
        assert np.array_equal(a.hidden, b.hidden)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(TraceError):
        RoutingTrace.load(p)
    with pytest.raises(TraceError):
        RoutingTrace.load(tmp_path / "missing.npz")


@pytest.mark.parametrize("arch,gate", [("qwen3_moe", "mlp.gate"), ("mixtral", "block_sparse_moe.gate")])
def test_routers_found_next_to_the_experts(tmp_path, arch, gate):
    path = write_synthetic_moe(tmp_path / arch, arch, bits=4, seed=1)
    model, _ = _stock(path)
    routers = find_routers(model)
    assert len(routers) == len(moe_modules(model)) == 2
    assert [r.path for r in routers] == [f"model.layers.{i}.{gate}" for i in range(2)]
    assert all(r.num_experts == 8 for r in routers)
    fp = model_fingerprint(model)
    assert fp["model_type"] == arch and fp["num_layers"] == 2 and fp["num_experts"] == 8


def test_fingerprint_tells_models_apart(tmp_path):
    a, _ = _stock(write_synthetic_moe(tmp_path / "a", "qwen3_moe", bits=4, seed=1))
    b, _ = _stock(write_synthetic_moe(tmp_path / "b", "qwen3_moe", bits=4, seed=2))
    fa, fb = model_fingerprint(a), model_fingerprint(b)
    assert fa["router_sha256"] != fb["router_sha256"]
    assert {k: v for k, v in fa.items() if k != "router_sha256"} == {k: v for k, v in fb.items() if k != "router_sha256"}
