"""`chronos bench`: stock mlx_lm and chronos side by side, in one process."""

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ChronosError
from .app import app
from .common import MODEL_HELP, DTYPE_HELP, DtypeChoice, err, human_bytes, model_name, note_line, out, user_errors

BENCH_COLUMNS = [
    ("name", "config"),
    ("decode_tokens_per_s", "decode tok/s"),
    ("ratio_to_resident", "x resident"),
    ("roofline_tokens_per_s", "roofline tok/s"),
    ("ratio_to_roofline", "x roofline"),
    ("ttft_s", "TTFT s"),
    ("io_bound_tokens_per_s", "bound tok/s"),
    ("prediction_recall", "recall"),
    ("mlx_peak_memory_bytes", "peak mem"),
]
# Misses and I/O, a second table (one wide table would be squeezed on a terminal).
IO_COLUMNS = [
    ("name", "config"),
    ("decode_hit_rate", "decode hits"),
    ("stall_s_per_token", "stall ms/tok"),
    ("sync_wait_s_per_token", "routing wait ms/tok"),
    ("decode_bytes_read_per_token", "read/tok"),
    ("belady_decode_bytes_read_per_token", "Belady read/tok"),
    ("effective_load_bytes_per_s", "load GB/s"),
    ("load_rate_to_roofline", "x probe rate"),
    ("host_syncs_per_token", "syncs/tok"),
    ("recomputed_layers_per_token", "recomputed layers/tok"),
    ("recomputed_rows_per_token", "recomputed rows/tok"),
]  # everything else (prefill, spread, prefetch...) is in --json


def _bench_cell(key: str, row: dict) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "decode_tokens_per_s":
        return f"{v:.1f}"
    if key in ("stall_s_per_token", "sync_wait_s_per_token"):
        return f"{v * 1e3:.2f}"
    if key == "effective_load_bytes_per_s":
        return f"{v / 1e9:.2f}"
    if key.endswith("bytes") or "bytes_read" in key:
        return human_bytes(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    return escape(str(v))


def check_output_file(path: Path, what: str):
    """An output file named on the command line can be written: not a directory, its
    directory exists and is writable (checked before a run that may take an hour)."""
    import os

    path = Path(path).expanduser()
    if path.is_dir():
        raise ChronosError(f"{what} {path}: is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise ChronosError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ChronosError(f"{what} {path}: cannot write there (permission denied)")


@app.command()
@user_errors
def bench(
    workload: Annotated[str, typer.Option("--workload", "-w", help="Prompts: a JSONL file or a shipped workload (en, de, fr, es, it, python, c).")] = "en",
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="How many prompts of the workload (held-out half).")] = 2,
    budgets: Annotated[str, typer.Option("--budgets", help="Comma-separated expert budgets to measure chronos at.")] = "1,0.5,0.25,0.125",
    profile: Annotated[Optional[str], typer.Option("--profile", help="Profile (name or path) for the profile+usage configurations.")] = None,
    predictor: Annotated[Optional[str], typer.Option("--predictor", help="Predictor for the async-I/O configurations (none, markov, lookahead, intent, gate, all).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens generated per prompt.")] = 64,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", min=1, help="Prompts are cut to their last N tokens.")] = 128,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Measured repetitions per configuration (median and spread reported).")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Unmeasured warm-up repetitions.")] = 1,
    policy: Annotated[str, typer.Option("--policy", help="Also measure chronos with this eviction policy (lru, lfu, usage): the row chronos-POLICY. Default usage, what generate, chat and serve use; lru: the chronos-lru rows only.")] = "usage",
    only: Annotated[Optional[str], typer.Option("--only", help="Only configurations whose name starts with one of these (comma-separated).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every figure, the machine and the command to this JSON file.")] = None,
    png: Annotated[Optional[Path], typer.Option("--png", help="Write a plot of decode speed against budget.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    dtype: Annotated[DtypeChoice, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    io_sim: Annotated[Optional[str], typer.Option("--io-sim", help="Simulated SSD for chronos reads, e.g. 'bandwidth=5GB/s,latency=80us' or just '5GB/s'.")] = None,
    direct_io: Annotated[bool, typer.Option("--direct-io", help="Bypass the page cache for chronos reads.")] = False,
    replay: Annotated[bool, typer.Option("--replay/--greedy", help="Replay (default): force-decode each workload text's own next tokens, so every configuration decodes the same real text; --greedy: greedy decoding.")] = True,
    temp: Annotated[Optional[float], typer.Option("--temp", min=0.0, help="Sample at this temperature instead (replaces replay; chronos recomputations draw again, so tokens may differ between configurations).")] = None,
    routing: Annotated[str, typer.Option("--routing", help="'model': the checkpoint's routers; 'trained': trained-like routing for random-weight checkpoints, calibrated to the demo model on the same text (needs replay).")] = "model",
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Measure the read rate of expert-sized reads (1..N threads) first: the I/O roofline.")] = True,
    interleave: Annotated[bool, typer.Option("--interleave", help="Load every configuration at once and measure them round by round, each round starting one further on: drift (a busy or throttling machine) hits all alike, and each row also gets its speed over stock's in the same round ('x resident, paired': median, spread in --json). Needs memory for all configurations at once.")] = False,
):
    """Benchmark stock mlx_lm and chronos side by side, in one process, on the same prompts.

    Configurations: mlx_lm-resident (whole model in memory: the ceiling; skipped when it does
    not fit), mlx_lm-mmap (lazy load), chronos-lru (on-demand loads), chronos-usage (the default
    policy: what generate, chat and serve run), chronos-predict (async I/O + predictors),
    chronos-profile (profile + usage policy), chronos-all; each chronos one at every --budgets value. Each is warmed up and repeated; medians and spread are shown.

    Decoding: replay by default (each workload text is cut into a prompt and the tokens that
    follow it, which are forced one by one: real token statistics, the same tokens for every
    configuration); --greedy or --temp T instead. Beside each chronos row: its effective load
    rate (decode bytes read / stall), the I/O roofline min(resident tok/s, read rate / decode
    bytes per token) from the read probe (or --io-sim's bandwidth) and the ratio to it.

    A configuration that fails while it runs (a runtime error in its decoding) is reported
    with its error; the others are still measured and saved, and the exit status is 1.

    Example: chronos bench --workload it --budgets 1,0.5,0.25 --io-sim bandwidth=5GB/s,latency=80us --json out.json --png out.png
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .. import bench as B
    from ..io import parse_io_sim
    from ..loader import plan_model
    from ..workloads import load_prompts

    parse_io_sim(io_sim)  # a bad spec is an error before anything is loaded
    from ..policy import POLICIES

    if policy not in POLICIES:
        raise ChronosError(f"--policy must be one of {', '.join(sorted(POLICIES))}, not '{policy}'")
    for path, what in ((json_out, "--json"), (png, "--png")):  # outputs: checked now, not after the run
        if path is not None:
            check_output_file(path, what)
    if png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ChronosError("--png needs matplotlib: pip install 'chronos-mlx[plot]'") from None
    try:
        budget_list = [float(b) if float(b) <= 1 else b for b in budgets.split(",") if b.strip()]
    except ValueError:
        budget_list = [b.strip() for b in budgets.split(",") if b.strip()]
    dtype_arg = None if dtype == "auto" else dtype
    info = plan_model(model, dtype_arg).info
    if not info.get("num_experts"):
        raise ChronosError(f"{info['path']}: no MoE layers, nothing to benchmark")
    from ..budget import slots_for_budget

    for b in budget_list:  # too small a budget is an error now, not after an hour
        slots_for_budget(b, num_layers=info["moe_layers"], num_experts=info["num_experts"],
                         top_k=info["top_k"], bytes_per_expert=info["bytes_per_expert"])
    if routing not in ("model", "trained"):
        raise ChronosError(f"--routing must be 'model' or 'trained', not '{routing}'")
    if temp is not None and temp > 0:
        replay = False
    if routing == "trained" and not replay:
        raise ChronosError("--routing trained routes by the replayed text: use it with replay (no --greedy / --temp)")
    forced = None
    if replay:
        prompt_ids, forced = B.replay_texts(workload, model, limit=prompts, max_prompt_tokens=max_prompt_tokens,
                                            max_tokens=max_tokens, split="heldout")
    else:
        prompt_ids = load_prompts(workload, model, limit=prompts, max_prompt_tokens=max_prompt_tokens, split="heldout")
    configs, notices = B.plan_configs(
        budget_list, info=info, io_sim=io_sim, direct_io=direct_io, predictor=predictor, profile=profile,
        policy=policy, only=only.split(",") if only else None,
    )
    routing_info = None
    if routing == "trained":
        from ..bench_routing import calibrate_for_workload, routing_setup

        err.print("calibrating trained-like routing against the demo model on the same text ...")
        params = calibrate_for_workload(workload, prompt_ids, forced, info["num_experts"], info["top_k"], limit=prompts,
                                        max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens)
        routing_info = {"routing": "trained", **B.asdict(params)}
        for cfg in configs:
            cfg.setup = routing_setup(params)
        err.print(f"routing: popularity exponent {params.alpha:.3f}; LRU decode hit demo "
                  + ", ".join(f"{b}: {params.targets[b]:.3f} / here {params.fitted[b]:.3f}" for b in params.targets))
    probe_result = None
    if probe:
        from ..probe import format_probe, probe_read_bandwidth

        chunk = info.get("bytes_per_expert_on_disk") or info["bytes_per_expert"]
        try:
            probe_result = probe_read_bandwidth(info["path"], chunk)
            err.print(escape(format_probe(probe_result)))
        except (OSError, ValueError) as e:
            notices.append(f"read probe skipped: {e}")
    for n in notices:
        note_line(n)
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=not err.is_terminal) as progress:
        task = progress.add_task("bench", total=len(configs) * (warmup + repeats) * len(prompt_ids))
        if interleave:
            progress.update(task, description=f"{'all, round by round':<28}")
            rows = B.measure_interleaved(configs, model, prompt_ids, max_tokens=max_tokens, repeats=repeats,
                                         warmup=warmup, dtype=dtype_arg, forced=forced, temp=temp,
                                         progress=lambda: progress.advance(task))
        for cfg in [] if interleave else configs:
            progress.update(task, description=f"{cfg.name:<28}")
            rows.append(B.measure(cfg, model, prompt_ids, max_tokens=max_tokens, repeats=repeats, warmup=warmup,
                                  dtype=dtype_arg, progress=lambda: progress.advance(task), forced=forced, temp=temp))
    decoding = "replay" if replay else f"temp={temp}" if temp else "greedy"
    result = B.report(rows, probe=probe_result, command="chronos " + " ".join(sys.argv[1:]), model=info,
                      workload=workload, io_sim=io_sim, direct_io=direct_io, max_tokens=max_tokens,
                      prompts=len(prompt_ids), repeats=repeats, warmup=warmup, notices=notices, decoding=decoding,
                      interleaved=interleave,
                      routing=routing_info or {"routing": "model"},
                      title=f"{model_name(info)} · {workload} · {decoding} · {io_sim or 'page cache'}")
    bench_columns = BENCH_COLUMNS
    if any(r.get("paired_ratio_to_resident") is not None for r in result["results"]):  # --interleave
        at = [k for k, _ in BENCH_COLUMNS].index("ratio_to_resident") + 1
        bench_columns = BENCH_COLUMNS[:at] + [("paired_ratio_to_resident", "x resident, paired")] + BENCH_COLUMNS[at:]
    for columns, title in ((bench_columns, result["title"]), (IO_COLUMNS, "misses and I/O")):
        table = Table(title=title)
        for _, head in columns:
            # names fold rather than being cut with "…"; figures never wrap
            table.add_column(head, justify="left", overflow="fold", min_width=12) if head == "config" else table.add_column(
                head, justify="right", no_wrap=True
            )
        for r in result["results"]:
            if columns is IO_COLUMNS and r.get("kind") != "chronos":
                continue
            table.add_row(*(_bench_cell(k, r) for k, _ in columns))
        out.print(table)
    if json_out:
        from ..profiles import atomic_write_text

        try:
            atomic_write_text(json_out, json.dumps(result, indent=2, default=str))
            err.print(f"wrote {json_out}")
        except OSError as e:  # the table above is printed: the run is not lost
            raise ChronosError(f"{json_out}: cannot write ({e.strerror or e}); the results are in the table above") from None
    if png:
        try:
            B.plot(result, png)
            err.print(f"wrote {png}")
        except OSError as e:
            raise ChronosError(f"{png}: cannot write ({e.strerror or e}); the results are in the table above") from None
    failed = [r for r in result["results"] if r.get("error")]
    for r in failed:
        err.print(f"[red]{escape(r['name'])} failed:[/red] {escape(r['error'])}")
    if failed:  # the others are measured and saved above; the exit status still says so
        err.print(f"error: {len(failed)} of {len(result['results'])} configurations failed; the other figures "
                  "are in the table" + (" and --json" if json_out else ""))
        raise typer.Exit(1)
