"""`chronos bench`: one JSON report with stock and chronos configurations, clear errors for bad arguments."""

import json

import pytest
from typer.testing import CliRunner

from chronos_mlx import bench
from chronos_mlx.cli import app
from synthetic import write_synthetic_moe

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_moe(tmp_path_factory.mktemp("b") / "m", "qwen3_moe", bits=4, seed=1)


def _bench(tiny, tmp_path, *extra):
    out = tmp_path / "r.json"
    args = ["bench", "-m", str(tiny), "--budgets", "1,0.25", "--max-tokens", "4", "--repeats", "1",
            "--warmup", "0", "--prompts", "1", "--json", str(out), *extra]
    result = runner.invoke(app, args)
    return result, out


def test_bench_writes_one_report_with_the_generate_json_stat_names(tiny, tmp_path):
    result, out = _bench(tiny, tmp_path, "--png", str(tmp_path / "r.png"))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names[:2] == ["mlx_lm-resident", "mlx_lm-mmap"]
    assert "chronos-lru@1.0" in names and "chronos-lru@0.25" in names
    assert "chronos-usage@0.25" in names  # the default policy: what generate, chat and serve run
    for key in ("platform", "mlx", "device", "memory_bytes", "expert_writes"):
        assert key in report["machine"]
    lru = next(r for r in report["results"] if r["name"] == "chronos-lru@0.25")
    for key in ("decode_tokens_per_s", "ttft_s", "hit_rate", "stall_s_per_token", "bytes_read_per_token",
                "ratio_to_resident", "prediction_recall", "mlx_peak_memory_bytes", "belady_bytes_read_per_token"):
        assert key in lru
    assert lru["belady_bytes_read_per_token"] <= lru["bytes_read_per_token"]  # nobody beats the oracle
    assert lru["prediction_recall"] is None  # no predictor: no recall (not a recall of 0)
    assert lru["device_copy_bytes"] == 0 and lru["device_copy_error"] is None  # no CUDA here: host writes
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_io_sim_adds_the_bound_it_implies(tiny, tmp_path):
    result, out = _bench(tiny, tmp_path, "--io-sim", "bandwidth=1GB/s,latency=50us", "--only", "chronos")
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert all(r["name"].startswith("chronos") for r in rows)
    partial = next(r for r in rows if r["name"] == "chronos-lru@0.25")
    assert partial["io_bound_tokens_per_s"] == pytest.approx(1e9 / partial["belady_bytes_read_per_token"])


def _failing_at(budget, monkeypatch):
    """Make every decode of chronos at `budget` raise a runtime error (as device-wait does when
    a kernel gives up); the other configurations run as usual."""
    real = bench._run_prompts

    def run(model, runtime, *a, **k):
        if runtime is not None and runtime.info.get("budget_fraction") == budget:
            raise RuntimeError("a MoE layer stopped waiting for its experts")
        return real(model, runtime, *a, **k)

    monkeypatch.setattr(bench, "_run_prompts", run)


def test_a_configuration_that_fails_is_reported_and_the_others_are_measured(tiny, tmp_path, monkeypatch):
    _failing_at(0.25, monkeypatch)
    result, out = _bench(tiny, tmp_path, "--png", str(tmp_path / "r.png"))
    assert result.exit_code == 1
    assert "chronos-lru@0.25 failed" in result.output and "stopped waiting" in result.output
    assert "Traceback" not in result.output
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}  # written all the same
    assert rows["chronos-lru@0.25"]["error"] == "RuntimeError: a MoE layer stopped waiting for its experts"
    assert rows["chronos-lru@0.25"]["decode_tokens_per_s"] is None
    assert rows["chronos-lru@1.0"]["decode_tokens_per_s"] > 0 and rows["chronos-lru@1.0"]["ratio_to_resident"] > 0
    assert (tmp_path / "r.png").stat().st_size > 1000  # the plot leaves the failed one out


def test_interleaved_measurement_goes_on_without_a_configuration_that_failed(tiny, monkeypatch):
    _failing_at(0.25, monkeypatch)
    configs = [bench.BenchConfig(f"chronos@{b}", budget=str(b)) for b in (1.0, 0.25)]
    rows = bench.measure_interleaved(configs, str(tiny), [[1, 2, 3]], max_tokens=3, repeats=2, warmup=0)
    by_name = {r["name"]: r for r in rows}
    assert by_name["chronos@0.25"]["error"].startswith("RuntimeError")
    assert by_name["chronos@1.0"]["decode_tokens_per_s"] > 0
    assert bench.add_ratios(rows)  # figures where there are some, none where it failed


def test_resident_is_skipped_with_a_notice_when_the_model_cannot_fit(monkeypatch):
    monkeypatch.setattr(bench, "_memory_bytes", lambda: 1000)
    configs, notices = bench.plan_configs([1.0], info={"dense_bytes": 10**6, "expert_bytes_total": 10**9})
    assert bench.RESIDENT not in [c.name for c in configs]
    assert any("does not fit" in n for n in notices)


def test_device_wait_routing_is_compared_where_the_gpu_can_wait(monkeypatch):
    from chronos_mlx import device_wait

    info = {"dense_bytes": 10**6, "expert_bytes_total": 10**6}
    configs, _ = bench.plan_configs([0.5], info=info)
    assert not any(c.sync == "device-wait" for c in configs)  # this box: MLX's CPU backend
    monkeypatch.setattr(device_wait, "available", lambda: True)
    configs, _ = bench.plan_configs([0.5], info=info)
    waiting = [c for c in configs if c.sync == "device-wait"]
    assert [c.name for c in waiting] == ["chronos-device-wait@0.5"]


def test_device_fetch_is_compared_on_cuda_where_the_shards_fit_in_host_memory(monkeypatch):
    from chronos_mlx import device_wait

    monkeypatch.setattr(device_wait, "available", lambda: True)
    monkeypatch.setattr(bench, "_memory_bytes", lambda: 10**9)
    configs, _ = bench.plan_configs([0.5], info={"dense_bytes": 10**6, "expert_bytes_total": 10**6})
    assert [c.name for c in configs if c.sync == "device-fetch"] == ["chronos-device-fetch@0.5"]
    for info, io_sim, why in [({"dense_bytes": 10**6, "expert_bytes_total": 9 * 10**8}, None, "do not fit"),
                              ({"dense_bytes": 10**6, "expert_bytes_total": 10**6}, "5GB/s", "simulated drive")]:
        configs, notices = bench.plan_configs([0.5], info=info, io_sim=io_sim)
        assert not any(c.sync == "device-fetch" for c in configs)
        assert any(n.startswith("chronos-device-fetch skipped") and why in n for n in notices)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budgets", "0.01"], "one token uses"),
        (["--policy", "fifo"], "--policy must be one of lfu, lru, usage"),
        (["--io-sim", "speed=fast"], "unknown key"),
        (["--budgets", "1", "--workload", "klingon"], "no workload"),
    ],
)
def test_bad_arguments_are_one_clear_error(tiny, tmp_path, extra, message):
    result = runner.invoke(app, ["bench", "-m", str(tiny), "--max-tokens", "2", *extra])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_belady_is_optimal_on_a_known_sequence():
    seq = [frozenset(s) for s in ({1}, {2}, {3}, {1}, {2}, {4}, {1})]
    assert bench.belady_loads(seq, 2) == 5  # 1,2 cold; 3 evicts 2; 2 again; 4 evicts 2


@pytest.mark.parametrize("sync", ["per-layer", bench.PLAIN])
def test_the_decode_profiler_sees_the_decode_steps_of_both_loops(tiny, monkeypatch, sync):
    import cProfile

    import chronos_mlx

    model, _, runtime = chronos_mlx.load(str(tiny), expert_budget=0.5)
    prof = cProfile.Profile()
    monkeypatch.setattr(bench, "DECODE_PROFILER", prof)
    got = bench._chronos_run(model, runtime, [1, 2, 3, 4], 4, sync)
    assert got["decode_steps"] == 3
    assert prof.getstats()  # steps after the first token were profiled, in mlx_lm's loop as in chronos's


def test_the_decode_profiler_sees_stocks_decode_steps_too(tiny, monkeypatch):
    """Anything with enable() / disable() (a cProfile, bench_sync's phase clock) times stock's
    decode steps as it times chronos's: after the first token, once each run."""
    from mlx_lm import load as stock_load

    calls = []

    class Clock:
        def enable(self):
            calls.append("enable")

        def disable(self):
            calls.append("disable")

    model, _ = stock_load(str(tiny))
    monkeypatch.setattr(bench, "DECODE_PROFILER", Clock())
    got = bench._stock_run(model, [1, 2, 3, 4], 4)
    assert got["decode_steps"] == 3
    assert calls == ["enable", "disable"]


def test_interleaved_runs_time_each_configuration_with_its_own_profiler(tiny):
    """`profilers`: each configuration's own DECODE_PROFILER while its measured runs decode (not
    in warm-up, not in another configuration's turn), none afterwards."""
    seen = []

    class Clock:
        def __init__(self, name):
            self.name = name

        def enable(self):
            seen.append(self.name)

        def disable(self):
            pass

    configs = [bench.BenchConfig(bench.RESIDENT, kind=bench.RESIDENT), bench.BenchConfig("chronos@0.5", budget="0.5")]
    bench.measure_interleaved(configs, str(tiny), [[1, 2, 3]], max_tokens=3, repeats=2, warmup=1,
                              profilers={c.name: Clock(c.name) for c in configs})
    # The measured rounds, in turn; each round starts one configuration further on.
    assert seen == ["chronos@0.5", bench.RESIDENT, bench.RESIDENT, "chronos@0.5"]
    assert bench.DECODE_PROFILER is None


def test_interleaved_rows_pair_each_round_with_stocks_round(tiny, monkeypatch):
    """On a machine whose speed drifts, a configuration's speed over stock's of the same round is the
    figure: its median (and spread) is reported beside the ratio of the medians."""
    speeds = {bench.RESIDENT: [10.0, 20.0, 40.0], "chronos@0.5": [9.0, 14.0, 36.0]}  # a round each
    turns = {name: iter(v) for name, v in speeds.items()}
    real = bench._run_prompts

    def timed(model, runtime, *args, **kwargs):
        runs = real(model, runtime, *args, **kwargs)  # the real decode (routing, counts), then its speed set
        name = bench.RESIDENT if runtime is None else "chronos@0.5"
        speed = next(turns[name])
        return [{**r, "decode_steps": 10, "decode_s": 10 / speed} for r in runs]

    monkeypatch.setattr(bench, "_run_prompts", timed)
    configs = [bench.BenchConfig(bench.RESIDENT, kind=bench.RESIDENT), bench.BenchConfig("chronos@0.5", budget="0.5")]
    rows = {r["name"]: r for r in bench.measure_interleaved(configs, str(tiny), [[1, 2, 3]], max_tokens=3,
                                                            repeats=3, warmup=0)}
    row = rows["chronos@0.5"]
    assert row["paired_rounds"] == 3
    assert row["paired_ratio_to_resident"] == pytest.approx(0.9)  # rounds: 0.9, 0.7, 0.9
    assert (row["paired_ratio_to_resident_min"], row["paired_ratio_to_resident_max"]) == (pytest.approx(0.7),
                                                                                          pytest.approx(0.9))
    bench.add_ratios(list(rows.values()))
    assert row["ratio_to_resident"] == pytest.approx(14.0 / 20.0)  # the medians' ratio, as before
    assert "paired_ratio_to_resident" not in rows[bench.RESIDENT]


def test_bench_interleave_measures_round_by_round_and_pairs_each_row_with_stock(tiny, tmp_path):
    result, out = _bench(tiny, tmp_path, "--interleave", "--repeats", "2", "--only", "mlx_lm-resident,chronos-lru")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["interleaved"] is True
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"mlx_lm-resident", "chronos-lru@1.0", "chronos-lru@0.25"}
    for name in ("chronos-lru@1.0", "chronos-lru@0.25"):
        row = rows[name]
        assert row["paired_rounds"] == 2
        assert row["paired_ratio_to_resident_min"] <= row["paired_ratio_to_resident"] <= row["paired_ratio_to_resident_max"]
        assert row["budget_fraction"] == float(name.split("@")[1])  # the same fields as a row measured alone
        assert "belady_bytes_read_per_token" in row or name.endswith("1.0")
    assert "paired" in result.output  # the table's column
