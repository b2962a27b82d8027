"""`chronos doctor`: its JSON schema, its figures against the model's own facts, and what it says
when a model cannot fit. No weights are read unless --measure."""

import json

import pytest
from typer.testing import CliRunner

from chronos_mlx.budget import kv_bytes_per_token
from chronos_mlx.cli import app
from chronos_mlx.doctor import diagnose, lru_hit_rate
from chronos_mlx.loader import plan_model


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def run_json(runner, *args):
    result = runner.invoke(app, ["doctor", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


SCHEMA = {
    "schema_version": int,
    "weights_read": bool,
    "model": {"path": str, "model_type": str, "num_hidden_layers": int, "moe_layers": int, "num_experts": int, "top_k": int, "dtype": str},
    "needs": {
        "dense_bytes": int, "expert_bytes_total": int, "bytes_per_expert": int, "bytes_per_expert_on_disk": int,
        "kv_bytes_per_1k_tokens": int, "active_expert_bytes_per_token": int, "resident_total_bytes": int, "context_tokens": int,
    },
    "machine": {
        "total_bytes": int, "available_bytes": int, "available_source": str, "memory_bandwidth_bytes_per_s": float,
        "expert_writes": str, "sync_modes": list, "default_sync": str, "split_reads": str,
        "read": {"file": str, "bytes": int, "seconds": float, "bytes_per_s": float, "page_cache_dropped": bool, "note": str},
    },
    "recommendation": {"fits": bool, "budget": str, "fraction": float, "slots_per_layer": int, "expert_budget_bytes": int, "line": str},
    "speed": {"resident_tokens_per_s_bound": float, "read_bandwidth_bytes_per_s": float, "expected_tokens_per_s": list,
              "hit_rate_measured": bool, "assumption": str, "curve": list},
}
CURVE_POINT = {"fraction": float, "slots_per_layer": int, "hit_rate": float, "hit_rate_source": str,
               "bytes_read_per_token": float, "tokens_per_s_bound": float}


def check(obj, schema, where="report"):
    for key, kind in schema.items():
        assert key in obj, f"{where}.{key} missing"
        if isinstance(kind, dict):
            check(obj[key], kind, f"{where}.{key}")
        else:
            assert isinstance(obj[key], kind) or (kind is float and isinstance(obj[key], int)), f"{where}.{key}: {obj[key]!r}"


def test_doctor_json_schema_and_figures(runner):
    report = run_json(runner)
    check(report, SCHEMA)
    for p in report["speed"]["curve"]:
        check(p, CURVE_POINT, "curve point")
    plan = plan_model(None, "float32")
    info = plan.info
    needs = report["needs"]
    assert needs["dense_bytes"] == info["dense_bytes"]
    assert needs["expert_bytes_total"] == info["expert_bytes_total"]
    assert needs["bytes_per_expert"] == info["bytes_per_expert"]
    assert needs["kv_bytes_per_1k_tokens"] == kv_bytes_per_token(plan.config, 4) * 1000
    assert report["weights_read"] is False
    assert report["machine"]["expert_writes"] == "read straight into the slots (MLX's CPU backend)"
    assert report["machine"]["sync_modes"] == ["optimistic", "per-layer"]  # device-wait: CUDA only
    rec = report["recommendation"]
    assert rec["fits"] and rec["fraction"] == 1.0  # the demo model fits this machine
    lo, hi = report["speed"]["expected_tokens_per_s"]
    assert 0 < lo <= hi
    # the I/O model: tokens/s <= min(resident, read bandwidth / bytes read per token)
    bw = report["speed"]["read_bandwidth_bytes_per_s"]
    for p in report["speed"]["curve"]:
        assert p["hit_rate"] == pytest.approx(p["fraction"])  # unmeasured: the stated assumption
        if p["bytes_read_per_token"]:
            assert p["tokens_per_s_bound"] == pytest.approx(min(report["speed"]["resident_tokens_per_s_bound"], bw / p["bytes_read_per_token"]))


def test_doctor_with_a_memory_limit_recommends_a_partial_budget_and_measures_hit_rates(runner):
    report = run_json(runner, "--memory-limit", "280MB", "--measure")
    rec = report["recommendation"]
    assert rec["fits"] and 0 < rec["fraction"] < 1
    assert report["weights_read"] and report["speed"]["hit_rate_measured"]
    curve = {p["fraction"]: p["hit_rate"] for p in report["speed"]["curve"]}
    assert curve[1.0] == 1.0
    assert all(curve[a] >= curve[b] - 1e-9 for a, b in zip(sorted(curve, reverse=True), sorted(curve, reverse=True)[1:]))


def test_doctor_says_what_fails_when_the_model_cannot_fit(runner):
    report = run_json(runner, "--memory-limit", "150MB")
    assert report["recommendation"]["fits"] is False
    assert "cannot run" in report["fails"] and "one token's experts" in report["fails"]
    text = runner.invoke(app, ["doctor", "--memory-limit", "150MB"])
    assert text.exit_code == 0 and "does not fit" in text.stdout


def test_doctor_prints_a_readable_report(runner):
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0
    for words in ("what the model needs", "this machine", "read bandwidth", "recommended", "expected decode speed",
                  "expert loads", "split reads", "auto: optimistic"):
        assert words in result.stdout


def test_doctor_says_whether_device_fetch_would_fit_where_mlx_runs_on_cuda(runner, monkeypatch):
    from chronos_mlx import device_fetch, device_wait

    assert run_json(runner)["machine"]["device_fetch"] is None  # this box: no CUDA
    monkeypatch.setattr(device_wait, "available", lambda: True)
    fit = run_json(runner)["machine"]["device_fetch"]
    assert fit["fits"] and fit["shard_bytes"] > 40 * 2**20 and "auto does not pick it" in fit["line"]
    monkeypatch.setattr(device_fetch, "host_memory_bytes", lambda: 2**20)
    assert run_json(runner)["machine"]["device_fetch"]["fits"] is False
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0 and "device-fetch does not fit" in result.stdout


def test_lru_replay():
    steps = [[(True, [0, 1]), (False, [0, 2]), (False, [1, 2]), (False, [0, 1])]]
    # 2 slots: after warm {0,1}: [0 hit, 2 miss -> {0,2}], [1 miss, 2 hit -> {2,1}], [0 miss, 1 hit]
    assert lru_hit_rate(steps, 2) == pytest.approx(3 / 6)
    assert lru_hit_rate(steps, 3) == 1.0  # first uses while slots are free are not counted


def test_doctor_on_a_hugging_face_id_reads_only_config_index_and_headers(monkeypatch, runner, tmp_path):
    """Stand-in for the Hub: the demo model's files. Only config.json, the index and the
    shard headers are handed out; doctor's model facts equal the local checkpoint's."""
    import json as _json
    import shutil
    import struct
    from types import SimpleNamespace

    import huggingface_hub

    import chronos_mlx

    demo = chronos_mlx.DEFAULT_MODEL
    served = []

    def hf_hub_download(repo_id, filename, **kw):
        assert filename in ("config.json", "model.safetensors.index.json"), filename
        served.append(filename)
        dst = tmp_path / "hub" / filename
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(demo / filename, dst)
        return str(dst)

    def get_safetensors_metadata(repo_id, **kw):
        files = {}
        for shard in sorted(demo.glob("*.safetensors")):
            with open(shard, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = _json.loads(f.read(n))
            meta = header.pop("__metadata__", {})
            tensors = {k: SimpleNamespace(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"])) for k, v in header.items()}
            files[shard.name] = SimpleNamespace(metadata=meta, tensors=tensors)
        return SimpleNamespace(files_metadata=files)

    def snapshot_download(*a, **kw):
        raise FileNotFoundError("not in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    remote = diagnose("someone/demo-moe-4bit", dtype="float32")
    local = diagnose(None, dtype="float32")
    assert remote["model"]["path"] == "someone/demo-moe-4bit" and remote["model"]["local"] is False
    assert remote["needs"] == local["needs"]
    assert remote["recommendation"]["fraction"] == local["recommendation"]["fraction"]
    assert "scratch file" in remote["machine"]["read"]["file"]
    assert set(served) == {"config.json", "model.safetensors.index.json"}
