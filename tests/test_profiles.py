"""Workload profiles: recorded from the model's routing, saved atomically in a versioned file,
refused for another model, a clear error when damaged, and output-neutral when applied."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import chronos_mlx
from chronos_mlx import profiles as P
from chronos_mlx.cli.profile import pack, profile_app
from chronos_mlx.errors import ProfileError
from chronos_mlx.generate import generate_step
from synthetic import write_synthetic_moe

from conftest import DEMO, stock_greedy

PROMPTS = ["The history of the Roman Empire begins", "def main():\n    return 0"]
SHIPPED = ("english", "german", "french", "spanish", "italian", "python", "c")


@pytest.fixture(autouse=True)
def profile_dir(tmp_path, monkeypatch):
    d = tmp_path / "profiles"
    monkeypatch.setenv("CHRONOS_PROFILE_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "a": write_synthetic_moe(root / "a", "qwen3_moe", bits=4, seed=1),
        "b": write_synthetic_moe(root / "b", "qwen3_moe", bits=4, seed=2),  # same shape, other weights
        "mixtral": write_synthetic_moe(root / "m", "mixtral", bits=4, seed=1),
    }


def _record(path, name="work", prompts=PROMPTS, max_tokens=6):
    model, tokenizer, runtime = chronos_mlx.load(path, expert_budget=1.0)
    return P.record_profile(model, tokenizer, runtime, prompts, name=name, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def tiny_profile(tiny):
    return _record(tiny["a"])


@pytest.fixture(scope="module")
def demo_profile():
    return _record(DEMO, "demo-roman", PROMPTS[:1], max_tokens=8)


def test_a_recorded_profile_counts_every_token_and_survives_a_round_trip(tiny_profile, profile_dir):
    p = tiny_profile
    assert (p.counts.sum(axis=1) == p.tokens * p.top_k).all()
    np.testing.assert_allclose(p.frequencies().sum(axis=1), p.top_k)
    path = P.save_profile(p)
    assert path == profile_dir / "work.json"
    data = json.loads(path.read_text())
    assert data["format"] == "chronos-mlx-profile" and data["version"] == P.PROFILE_VERSION
    q = P.load_profile("work")
    assert q.name == "work" and q.fingerprint == p.fingerprint
    np.testing.assert_array_equal(q.counts, p.counts)
    np.testing.assert_array_equal(q.coactivation, p.coactivation)
    np.testing.assert_array_equal(q.tokens, p.tokens)
    assert P.load_profile(str(path)).name == "work"  # a path works as well as a name


def test_a_profile_for_another_model_is_refused_with_a_clear_message(tiny, tiny_profile):
    model, _, runtime = chronos_mlx.load(tiny["b"], expert_budget=0.5)
    with pytest.raises(ProfileError, match="router weights differ.*chronos profile record"):
        P.apply_profile(runtime, model, tiny_profile)
    model, _, runtime = chronos_mlx.load(tiny["mixtral"], expert_budget=0.5)
    with pytest.raises(ProfileError, match=r"recorded for another model \(qwen3_moe.*this model is mixtral"):
        P.apply_profile(runtime, model, tiny_profile)
    assert not (runtime.cache.layers[0].slot_of >= 0).any()  # nothing was pre-warmed


def test_damaged_profiles_are_errors_that_lose_nothing_else(tiny_profile, profile_dir):
    good = P.save_profile(tiny_profile)
    text = good.read_text()
    (profile_dir / "truncated.json").write_text(text[: len(text) // 2])
    tampered = json.loads(text)
    tampered["counts"][0][0] += 1  # no longer adds up to tokens x top_k
    (profile_dir / "tampered.json").write_text(json.dumps(tampered))
    future = dict(json.loads(text), version=P.PROFILE_VERSION + 1)
    (profile_dir / "future.json").write_text(json.dumps(future))

    with pytest.raises(ProfileError, match="truncated.json: corrupt or truncated"):
        P.load_profile("truncated")
    with pytest.raises(ProfileError, match="do not add up"):
        P.load_profile("tampered")
    with pytest.raises(ProfileError, match="newer than this chronos-mlx reads"):
        P.load_profile("future")
    with pytest.raises(ProfileError, match="no profile named 'missing'"):
        P.load_profile("missing")
    listed = {path.stem: p for path, p in P.list_profiles()}
    assert isinstance(listed["truncated"], ProfileError) and isinstance(listed["tampered"], ProfileError)
    assert isinstance(listed["work"], P.Profile)  # the good one is still there
    assert good.read_text() == text


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_one(tiny_profile, profile_dir, monkeypatch):
    path = P.save_profile(tiny_profile)
    before = path.read_text()
    tiny_profile.meta["note"] = "second version"

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.save_profile(tiny_profile)
    monkeypatch.undo()
    tiny_profile.meta.pop("note")
    assert path.read_text() == before
    assert sorted(p.name for p in profile_dir.iterdir()) == ["work.json"]  # no temporary left


def _cli():
    app = typer.Typer()
    app.add_typer(profile_app, name="profile")
    app.command("pack")(pack)
    return app


def test_cli_record_list_show_diff(tiny, profile_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    runner = CliRunner()
    app = _cli()
    for name, lines in (("one", PROMPTS[:1]), ("two", PROMPTS[1:])):
        r = runner.invoke(
            app, ["profile", "record", "-m", str(tiny["a"]), "--name", name, "--prompts", str(prompts),
                  "--split", "train" if name == "one" else "heldout", "-n", "4"],
        )
        assert r.exit_code == 0, r.output
    assert {p.name for p in profile_dir.iterdir()} == {"one.json", "two.json"}

    listed = json.loads(runner.invoke(app, ["profile", "list", "--json"]).stdout)
    assert {row["name"] for row in listed} >= {"one", "two"}
    shown = json.loads(runner.invoke(app, ["profile", "show", "one", "--json", "--top", "3"]).stdout)
    assert len(shown["hot"]) == 2 and len(shown["hot"][0]) == 3
    png = tmp_path / "heat.png"
    r = runner.invoke(app, ["profile", "show", "one", "--png", str(png)])
    assert r.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG" and "L0" in r.stdout
    rows = json.loads(runner.invoke(app, ["profile", "diff", "one", "two", "--top", "4", "--json"]).stdout)
    assert len(rows) == 2 and all(0 <= row["jaccard"] <= 1 for row in rows)
    same = json.loads(runner.invoke(app, ["profile", "diff", "one", "one", "--json"]).stdout)
    assert all(row["jaccard"] == 1.0 for row in same)

    r = runner.invoke(app, ["profile", "show", "nope"])
    assert r.exit_code == 2 and "no profile named 'nope'" in r.output


def test_an_interrupted_recording_writes_nothing(tiny, profile_dir, monkeypatch):
    import chronos_mlx.generate as gen

    real = gen.generate_step
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C during the second prompt
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_step", interrupted)
    r = CliRunner().invoke(_cli(), ["profile", "record", "-m", str(tiny["a"]), "--name", "cut", "--prompts", "en", "--limit", "3"])
    assert r.exit_code == 130
    assert not profile_dir.exists() or not any(profile_dir.iterdir())


@pytest.mark.parametrize("policy", ["usage", "lru"])
def test_a_profile_applied_changes_no_token(policy, demo_prompt_ids, demo_profile):
    ref, _ = stock_greedy(DEMO, demo_prompt_ids, 16)
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.25, policy=policy)
    thread = P.apply_profile(runtime, model, demo_profile)  # pre-warm runs while we decode
    ids = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=16)]
    thread.join()
    assert thread.error is None and thread.loaded > 0
    assert ids == ref
    assert runtime.info["profile"] == "demo-roman"
    if policy == "usage":
        assert all(L.policy.prior.any() for L in runtime.cache.layers)  # seeded


def test_prewarm_loads_the_profiles_hottest_experts_into_free_slots(demo_profile):
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.125, policy="usage")
    P.apply_profile(runtime, model, demo_profile).join()
    for layer, L in enumerate(runtime.cache.layers):
        assert set(np.flatnonzero(L.slot_of >= 0).tolist()) == set(demo_profile.hot(layer, L.num_slots).tolist())


def test_shipped_profiles_fit_the_demo_model():
    found = {path.stem: p for path, p in P.list_profiles() if path.parent == P.shipped_profile_dir()}
    assert set(SHIPPED) <= set(found)
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.25)
    fingerprint = P.model_fingerprint(runtime, model)
    for name in SHIPPED:
        assert isinstance(found[name], P.Profile), found[name]
        P.check_fingerprint(found[name], fingerprint)
        assert found[name].meta["split"] == "train"  # recorded from the first half only
