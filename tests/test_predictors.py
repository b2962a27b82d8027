"""Expert predictors: one interface, cheap scores on a stream of their own, deterministic
training that lowers the loss, files that round-trip and refuse another model."""

import mlx.core as mx
import numpy as np
import pytest

from chronos_mlx.errors import ChronosError, ProfileError
from chronos_mlx.predictors import (
    LOOKAHEAD_TARGETS,
    CrossLayerGatePredictor,
    IntentClassifier,
    LookaheadConfig,
    LookaheadRouter,
    MarkovPredictor,
    PreviousTokenPredictor,
    evaluate_intent,
    evaluate_predictors,
    load_predictors,
    prompt_baseline_scores,
    train_intent,
    train_lookahead,
)
from synthetic import write_synthetic_moe
from chronos_mlx.traces import find_routers, model_fingerprint, record_traces

PROMPTS = [
    "The history of the Roman Empire begins",
    "def parse(self, text):\n    return",
    "NAME\n\nls - list directory contents",
    "Die Geschichte des",
]


def _stock(path):
    from mlx_lm import load

    model, tok = load(str(path))
    model.set_dtype(mx.float32)
    return model, tok


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    path = write_synthetic_moe(root / "q", "qwen3_moe", bits=4, seed=7, num_layers=4)
    model, tok = _stock(path)
    trace = record_traces(model, tok, PROMPTS, max_tokens=12, stop_at_eos=False)
    return model, tok, trace


def _all(model, trace, lookahead=None):
    markov = MarkovPredictor(trace.num_layers, trace.num_experts, trace.top_k).fit(trace)
    return {
        "previous": PreviousTokenPredictor.for_trace(trace),
        "gate": CrossLayerGatePredictor.from_model(model, top_k=trace.top_k),
        "markov": markov,
        "lookahead": lookahead or train_lookahead(trace, epochs=1, batch_size=16)[0],
    }


def test_lookahead_has_at_most_2m_parameters_for_the_demo_geometry():
    demo = LookaheadRouter(LookaheadConfig(num_layers=8, num_experts=64, hidden_size=384, top_k=8))
    assert demo.targets == LOOKAHEAD_TARGETS
    assert 100_000 < demo.num_parameters() <= 2_000_000


def test_every_predictor_has_the_same_interface(setup):
    model, _, trace = setup
    seq = trace.sequences[0]
    for name, p in _all(model, trace).items():
        p.reset()
        L, E = trace.num_layers, trace.num_experts
        for layer in range(L):
            p.observe(layer, seq.experts[layer, :3].reshape(-1))
        for layer in range(L):
            x = mx.array(seq.hidden[layer, 2].astype(np.float32))
            s = p.scores(layer, x)
            assert s.shape == (len(p.targets), E), name
            ranked = p.ranked(layer, x, k=3)
            assert set(ranked) == {(layer + dl, dt) for dl, dt in p.targets if layer + dl < L}
            assert all(len(v) == 3 and len(set(v.tolist())) == 3 for v in ranked.values())
        off = p.score_trace(seq)
        assert off.shape == (L, seq.length, len(p.targets), E)
        # The online path (observe, then scores) and the offline one agree at position 2.
        for layer in range(L - 1):
            on = np.array(p.scores(layer, mx.array(seq.hidden[layer, 2].astype(np.float32))))
            for j, ok in enumerate(p.valid(layer)):
                if ok and p.targets[j][1]:  # token targets: the history is tokens 0..2
                    np.testing.assert_allclose(on[j], off[layer, 2, j], rtol=1e-4, atol=1e-4)


def test_cross_layer_gate_is_the_next_layers_router(setup):
    model, _, trace = setup
    gate = CrossLayerGatePredictor.from_model(model)
    routers = find_routers(model)
    x = mx.array(trace.sequences[1].hidden[1, -1].astype(np.float32))
    s = np.array(gate.scores(1, x))
    np.testing.assert_allclose(s[gate.row(1, 0)], np.array(routers[2].logits(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s[gate.row(2, 0)], np.array(routers[3].logits(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s[gate.row(0, 1)], np.array(routers[1].logits(x)), rtol=1e-5, atol=1e-5)


def test_the_runtimes_next_layer_gate_scores_like_the_general_one(setup):
    # The runtime asks one target, (1, 0), at every host read: a shorter path, same numbers.
    model, _, trace = setup
    general = CrossLayerGatePredictor.from_model(model)
    single = CrossLayerGatePredictor.from_model(model, targets=((1, 0),))
    x = mx.array(trace.sequences[1].hidden[2, -1].astype(np.float32))
    np.testing.assert_array_equal(np.array(single.scores(2, x)), np.array(general.scores(2, x))[[general.row(1, 0)]])
    last = single.num_layers - 1  # nothing ahead: zeros, as in the general form
    assert not np.array(single.scores(last, x)).any()


def test_scores_run_on_a_stream_of_their_own(setup):
    model, _, trace = setup
    preds = _all(model, trace)
    side = mx.new_stream(mx.default_device())
    x = mx.array(trace.sequences[0].hidden[0, -1].astype(np.float32)) * 1.0  # lazy, main stream
    for name in ("lookahead", "gate", "markov"):
        ref = np.array(preds[name].scores(0, x))
        with mx.stream(side):
            s = preds[name].scores(0, x)
            mx.async_eval(s)
        np.testing.assert_allclose(np.array(s), ref, rtol=1e-6, atol=1e-6)
    with mx.stream(side):
        top = preds["lookahead"].top(0, x, 4)
    assert top.shape == (len(LOOKAHEAD_TARGETS), 4)


def test_training_is_deterministic_and_lowers_the_loss(setup):
    model, _, trace = setup
    routers = find_routers(model)
    a, ha = train_lookahead(trace, routers=routers, epochs=3, batch_size=16, seed=3)
    b, hb = train_lookahead(trace, routers=routers, epochs=3, batch_size=16, seed=3)
    c, _ = train_lookahead(trace, routers=routers, epochs=3, batch_size=16, seed=4)
    assert ha == hb
    assert hb["final_loss"] < hb["initial_loss"]
    x = mx.array(trace.sequences[2].hidden[0].astype(np.float32))
    assert np.array_equal(np.array(a.scores_batch(0, x)), np.array(b.scores_batch(0, x)))
    assert not np.array_equal(np.array(a.scores_batch(0, x)), np.array(c.scores_batch(0, x)))
    ia, hia = train_intent(trace, epochs=40, seed=1)
    ib, hib = train_intent(trace, epochs=40, seed=1)
    assert hia == hib and hia["final_loss"] < hia["initial_loss"]


def test_router_initialisation_starts_at_the_cross_layer_gate(setup):
    model, _, trace = setup
    r, _ = train_lookahead(trace, routers=find_routers(model), epochs=0)
    gate = CrossLayerGatePredictor.from_model(model)
    x = mx.array(trace.sequences[0].hidden[0, -1].astype(np.float32))
    np.testing.assert_allclose(np.array(r.scores(0, x)), np.array(gate.scores(0, x)), rtol=1e-3, atol=1e-3)


def test_save_load_round_trip_and_fingerprint_refusal(setup, tmp_path):
    model, _, trace = setup
    la, _ = train_lookahead(trace, epochs=1, batch_size=16)
    markov = MarkovPredictor(trace.num_layers, trace.num_experts, trace.top_k).fit(trace)
    intent, _ = train_intent(trace, epochs=10)
    la.save(tmp_path / "lookahead.safetensors")
    markov.save(tmp_path / "markov.npz", fingerprint=trace.fingerprint)
    intent.save(tmp_path / "intent.safetensors")
    got = load_predictors(tmp_path, model=model)
    assert set(got) == {"lookahead", "markov", "intent"}
    x = mx.array(trace.sequences[0].hidden[1].astype(np.float32))
    # Saved in float16, computed in float32.
    np.testing.assert_allclose(np.array(la.scores_batch(1, x)), np.array(got["lookahead"].scores_batch(1, x)), atol=0.05, rtol=0.01)
    seq = trace.sequences[1]
    assert np.array_equal(markov.score_trace(seq), got["markov"].score_trace(seq))
    assert np.array_equal(intent.ranked(summary=_summary(seq, intent)), got["intent"].ranked(summary=_summary(seq, intent)))

    other = dict(model_fingerprint(model), router_sha256="0" * 64)
    for cls, name in ((LookaheadRouter, "lookahead.safetensors"), (MarkovPredictor, "markov.npz"), (IntentClassifier, "intent.safetensors")):
        with pytest.raises(ProfileError, match="another model"):
            cls.load(tmp_path / name, fingerprint=other)
    assert issubclass(ProfileError, ChronosError)
    (tmp_path / "lookahead.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ProfileError):
        LookaheadRouter.load(tmp_path / "lookahead.safetensors")


def _summary(seq, intent):
    from chronos_mlx.predictors import PromptSummary

    P = seq.n_prompt
    return PromptSummary.from_routing(seq.experts[:, :P], intent.config.num_experts, intent.config.recent, seq.hidden[:, :P])


def test_intent_runtime_accumulation_matches_the_offline_summary(setup):
    _, _, trace = setup
    intent, _ = train_intent(trace, epochs=10)
    seq = trace.sequences[0]
    P = seq.n_prompt
    intent.reset()
    for layer in range(trace.num_layers):
        for lo in range(0, P, 3):  # prefill in chunks
            intent.observe(layer, seq.experts[layer, lo : min(P, lo + 3)].reshape(-1))
            intent.observe_hidden(layer, mx.array(seq.hidden[layer, lo : min(P, lo + 3)]))
    ranked = intent.ranked(4)
    assert ranked.shape == (trace.num_layers, 4)
    np.testing.assert_array_equal(ranked, intent.ranked(4, summary=_summary(seq, intent)))


def test_evaluation_counts_recall_and_precision(setup):
    model, _, trace = setup

    class Oracle(PreviousTokenPredictor):
        name = "oracle"

        def score_trace(self, seq):
            L, T, _ = seq.experts.shape
            out = np.zeros((L, T, len(self.targets), self.num_experts), np.float32)
            for j, (dl, dt) in enumerate(self.targets):
                from chronos_mlx.predictors.base import _multi_hot

                out[: L - dl, : T - dt, j] = _multi_hot(seq.experts[dl:, dt:].astype(np.int64), self.num_experts)
            return out

    res = evaluate_predictors({"oracle": Oracle.for_trace(trace)}, trace, ks=(2, 4))
    for t, r in res["oracle"].items():
        assert r[2]["recall"] == pytest.approx(1.0) and r[2]["precision"] == pytest.approx(1.0)
        assert r[4]["recall"] == pytest.approx(1.0) and r[4]["precision"] == pytest.approx(0.5)
    ires = evaluate_intent({"prompt": prompt_baseline_scores}, trace, sizes=(2, 8))
    assert ires["prompt"][8]["recall"] == pytest.approx(1.0)  # all 8 experts
    assert 0 < ires["prompt"][2]["precision"] <= 1


def test_mlx_backend_trains_too(setup):
    _, _, trace = setup
    r, h = train_lookahead(trace, epochs=2, batch_size=16, backend="mlx")
    assert h["final_loss"] < h["initial_loss"] and r.config.meta["backend"] == "mlx"


def test_cli_train_then_eval(setup, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from chronos_mlx.cli.predictor import predictor_app

    model, _, _ = setup
    path = write_synthetic_moe(tmp_path / "m", "mixtral", bits=4, seed=2)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    monkeypatch.setenv("CHRONOS_PROFILE_DIR", str(tmp_path / "profiles"))
    runner = CliRunner()
    args = ["--model", str(path), "--prompts", str(prompts), "--max-tokens", "4"]
    r = runner.invoke(predictor_app, ["train", *args, "--epochs", "1", "--seed", "1"])
    assert r.exit_code == 0, r.output
    saved = tmp_path / "profiles" / "m" / "predictors"
    assert {p.name for p in saved.iterdir()} >= {"lookahead.safetensors", "lookahead.json", "markov.npz", "intent.safetensors"}
    r = runner.invoke(predictor_app, ["eval", *args, "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res["predictors"]) == {"previous token", "cross-layer gate", "markov (2nd order)", "lookahead router"}
    # Predictors of another model are refused with one error line.
    other = write_synthetic_moe(tmp_path / "o", "mixtral", bits=4, seed=3)
    r = runner.invoke(predictor_app, ["eval", "--model", str(other), "--prompts", str(prompts), "--predictors", str(saved)])
    assert r.exit_code == 2 and "error:" in r.output and "another model" in r.output
    r = runner.invoke(predictor_app, ["train", "--model", str(path), "--prompts", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 2 and "no such prompt file" in r.output
