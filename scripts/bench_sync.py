"""Decode speed of chronos vs stock mlx_lm, side by side in one process (issues 2 and 7).

    python scripts/bench_sync.py [--model DIR] [--budgets 1,0.5,0.25] [--max-tokens 64]
                                 [--repeats 3] [--prompts N] [--io-sim SPEC] [--json OUT]
                                 [--greedy | --temp T] [--routing trained] [--no-probe]

Configurations: stock mlx_lm (resident), then for each budget chronos in each --modes
variant: a routing mode, optionally with a predictor after a colon (per-layer:gate,
per-layer:lookahead, optimistic). Prints a markdown table; --json writes everything.

Decoding is replay by default: each workload text is cut into a prompt (its first
--max-prompt-tokens tokens) and the --max-tokens tokens that follow, which are forced one
by one, so stock and chronos decode the same real text (--greedy: greedy; --temp T:
sampling). --routing trained replaces a random-weight checkpoint's routers with a table
keyed by position, calibrated so LRU hits like the trained demo model on the same text
(chronos_mlx/bench_routing.py). Before measuring, a probe reads expert-sized ranges of the
shards into MLX memory with 1..N threads; each chronos row shows its effective load rate
and the I/O roofline min(resident tok/s, probe rate / decode bytes per token).
"""

import argparse
import time
import itertools
import json
import sys

import numpy as np
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if "--cpu" in sys.argv:  # before mlx_lm is imported: its generate_step binds its stream's device then
    import mlx.core as mx

    mx.set_default_device(mx.cpu)

from chronos_mlx.bench import RESIDENT, BenchConfig, asdict, measure, measure_interleaved, replay_texts, report  # noqa: E402
from chronos_mlx.workloads import load_prompts  # noqa: E402
from results import save_json  # noqa: E402


def _with_runtime(setup, **attrs):
    """`setup`, then the runtime attributes `attrs` (per-layer forms: pipelined, late_rows)."""
    def apply(model, runtime):
        if setup is not None:
            setup(model, runtime)
        if runtime is not None:
            for key, value in attrs.items():
                setattr(runtime, key, value)

    apply.params = getattr(setup, "params", None)
    return apply


def _with_guesses(setup, guesses, reads=None):
    """Prefetch `guesses` experts a layer (default: the model's top-k, set by attach_predictor);
    `reads`: how device-wait reads them (runtime.guess_reads: stage, load)."""
    if guesses is None and reads is None:
        return setup

    def apply(model, runtime):
        if setup is not None:
            setup(model, runtime)
        if runtime is not None:
            if guesses is not None:
                runtime.guesses = int(guesses)
            if reads is not None:
                runtime.guess_reads = reads

    apply.params = getattr(setup, "params", None)  # the routing's, for --modes ...:table
    return apply


def _dump_stacks_every(seconds: float, path: str):
    """Every `seconds`, every thread's stack to `path`, from a thread of its own. Not
    faulthandler's `dump_traceback_later`: it reads the frames without Python's lock and
    crashed a bench on the H200 (Python 3.12, session 18). This one needs the lock, so a run
    whose writes stop was stuck in a call that held it — which says something too."""
    import threading
    import time
    import traceback

    def dump():
        with open(path, "w") as out:
            while True:
                time.sleep(seconds)
                names = {t.ident: t.name for t in threading.enumerate()}
                out.write(f"--- {time.strftime('%H:%M:%S')}\n")
                for ident, frame in sys._current_frames().items():
                    out.write(f"thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
                out.flush()

    threading.Thread(target=dump, name="stack-dumper", daemon=True).start()


def _print_profile(prof, name: str, n: int):
    import io
    import pstats

    if not prof.getstats():  # no decode step ran (a failed configuration)
        print(f"--- {name}: nothing profiled", file=sys.stderr, flush=True)
        return
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(n)
        print(f"--- {name}: by {key}\n" + buf.getvalue().split("\n\n", 1)[-1], file=sys.stderr, flush=True)


class PhaseClock:
    """Where the decode's host time goes (--phases): time inside the model's forward (Python
    building the step's graph), inside mx.async_eval (MLX encoding and launching it) and inside
    mx.eval (waiting for results), while a configuration's clock is enabled (decode steps only;
    see bench.DECODE_PROFILER), kept apart by configuration (interleaved runs take turns).
    The rest of the wall time is the loop's own Python and, for stock, its `item()` wait."""

    PHASES = ("forward", "async_eval", "eval")

    def __init__(self, model_type: str):
        import importlib

        import mlx.core as mx

        self.seconds: dict = {}
        self.wall: dict = {}
        self._on, self._name, self._inside = None, None, False
        mx.async_eval = self._wrap("async_eval", mx.async_eval)
        mx.eval = self._wrap("eval", mx.eval)
        cls = importlib.import_module(f"mlx_lm.models.{model_type}").Model
        cls.__call__ = self._wrap("forward", cls.__call__)

    def _wrap(self, phase, fn):
        def timed(*args, **kwargs):
            if self._on is None or self._inside:  # nested calls count in the outer phase
                return fn(*args, **kwargs)
            self._inside = True
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                bucket = self.seconds.setdefault(self._name, dict.fromkeys(self.PHASES, 0.0))
                bucket[phase] += time.perf_counter() - t0
                self._inside = False

        return timed

    def of(self, name: str):
        """The clock of configuration `name`: enable() / disable(), as DECODE_PROFILER is driven."""
        clock = self

        class Configuration:
            def enable(self):
                clock._name, clock._on = name, time.perf_counter()

            def disable(self):
                if clock._on is not None:
                    clock.wall[name] = clock.wall.get(name, 0.0) + time.perf_counter() - clock._on
                    clock._on = None

        return Configuration()

    def take(self, name: str, tokens_per_s: float | None) -> dict:
        """Milliseconds a decoded token of `name` in each phase (and the rest)."""
        wall, seconds = self.wall.pop(name, 0.0), self.seconds.pop(name, {})
        if not wall or not tokens_per_s:
            return {}
        per_token = 1000.0 / tokens_per_s
        out = {k: per_token * seconds.get(k, 0.0) / wall for k in self.PHASES}
        out["rest"] = per_token - sum(out.values())
        return out


def _trace_planner() -> list:
    """Record what every SegmentPlanner decides and measures: [event, planner id, ...]."""
    from chronos_mlx.verification import SegmentPlanner

    events, ends, observe = [], SegmentPlanner.ends, SegmentPlanner.observe_step

    def traced_ends(self):
        got = ends(self)
        events.append(["ends", id(self), len(got), len(self._plan), len(self._alt),
                       {int(k): v for k, v in self._measured.items()}, self.coefficients().tolist(),
                       float(np.mean(self.miss))])
        return got

    def traced_observe(self, seconds, ends, recomputed_layers, recoveries, previous_ends=None):
        events.append(["step", id(self), seconds, ends, recomputed_layers, recoveries, previous_ends])
        return observe(self, seconds, ends, recomputed_layers, recoveries, previous_ends)

    SegmentPlanner.ends, SegmentPlanner.observe_step = traced_ends, traced_observe
    return events


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--budgets", default="1.0,0.5,0.25")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--workload", default="en")
    ap.add_argument("--io-sim", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--modes", default="optimistic,per-layer,mlx_lm",
                    help="chronos variants: optimistic (segments), per-layer (late rows on MLX's CPU backend, gated elsewhere), device-wait (CUDA: layers wait on the GPU for a loader thread, the GPU copying the loads), device-fetch (CUDA: layers copy their misses themselves from the shards held page-locked in host memory; no --io-sim), whole-token (optimistic, no segment end: a miss reloads every missed layer at once and recomputes), per-layer-stop (per-layer that stops graph construction at each layer, as before gates), mlx_lm (the chronos model in stock mlx_lm's loop); a -gates suffix (per-layer-gates, optimistic-gates, mlx_lm-gates) routes per layer through gates where late rows are the default (MLX's CPU backend), a -rows suffix (per-layer-rows, ...) with late rows where gates are (GPUs); :predictor appends one (gate, markov, lookahead, intent, all; table: with --routing trained, guesses as good as the demo's gate predictor, bench_guesses.py)")
    ap.add_argument("--interleave", action="store_true", help="load all, measure round-robin (noisy machines)")
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--greedy", action="store_true", help="greedy decoding instead of replay")
    ap.add_argument("--temp", type=float, default=None, help="sample at this temperature instead of replay")
    ap.add_argument("--routing", default="model", choices=["model", "trained"],
                    help="trained: trained-like routing for random-weight checkpoints (needs replay)")
    ap.add_argument("--no-probe", action="store_true", help="skip the read-bandwidth probe")
    ap.add_argument("--cpu", action="store_true", help="run MLX's CPU backend (also on a GPU host)")
    ap.add_argument("--policies", default="usage",
                    help="cache policies to compare (lru, lfu, usage; usage is chronos's default), each with every mode")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile each chronos configuration's decode steps (cProfile, main thread) and print "
                         "its N most costly functions (own time and with callees) to stderr (not with --interleave)")
    ap.add_argument("--phases", action="store_true",
                    help="split each configuration's decode time a token (stock's too) into the model's forward "
                         "(Python building the graph), mx.async_eval (MLX encoding and launching it), mx.eval "
                         "(waiting) and the rest; a column of the table and `phases_ms_per_token` in --json "
                         "(not with --profile; with --interleave each configuration's turns add up)")
    ap.add_argument("--guesses", default=None, metavar="N[,N...]",
                    help="with a predictor: prefetch this many guesses a layer (one configuration each; default top-k)")
    ap.add_argument("--guess-reads", default=None, metavar="stage,post,load",
                    help="device-wait with a predictor: load guesses inside the request (load, the default), read "
                         "them into staging after the answer (stage), and post them to their layer's kernel (post); "
                         "one configuration each. On the H200 (session 18) stage and post were slower than no "
                         "guesses, and stage hung twice (docs/device_wait.md)")
    ap.add_argument("--io-threads", metavar="N[,N...]",
                    help="reader threads for prefetches (one configuration each; 0: read on the main thread right "
                         "after the next launch; default 4, 16 with --io-sim)")
    ap.add_argument("--split-reads", metavar="auto|threads[,...]",
                    help="one row a way of reading a batch in parallel (auto: lio_listio where glibc has it)")
    ap.add_argument("--planner-trace", metavar="FILE",
                    help="write every segment planner decision and step measurement to FILE (JSON)")
    ap.add_argument("--dump-stacks", metavar="FILE", default=None,
                    help="every 4 s, every thread's stack to FILE (a thread of its own; writes stop while a call "
                         "holds Python's lock), to see where a run that hangs waits")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.dump_stacks:
        _dump_stacks_every(4.0, args.dump_stacks)
    trace = _trace_planner() if args.planner_trace else None
    if args.phases and args.profile:
        ap.error("--phases and --profile both time the decode steps: one at a time")

    if args.cpu:
        import mlx.core as mx
        import mlx_lm.generate

        mx.set_default_device(mx.cpu)
        # mlx_lm made its generation stream on the default device of import time.
        mlx_lm.generate.generation_stream = mx.new_stream(mx.cpu)
    replay = not args.greedy and not args.temp
    if args.routing == "trained" and not replay:
        ap.error("--routing trained needs replay (no --greedy / --temp)")
    from chronos_mlx import device_wait

    on_device = {"device-wait", "device-fetch"} & set(args.modes.replace(":", ",").split(","))
    if on_device and (args.cpu or not device_wait.available()):
        ap.error(f"--modes {', '.join(sorted(on_device))} needs MLX's CUDA backend (a GPU, without --cpu)")
    if any(v.partition(":")[2] == "table" for v in args.modes.split(",")) and args.routing != "trained":
        ap.error("predictor 'table' (--modes MODE:table) needs --routing trained")
    if args.guess_reads and not set(args.guess_reads.split(",")) <= {"stage", "post", "load"}:
        ap.error(f"--guess-reads {args.guess_reads}: each one of stage, post, load")
    if args.split_reads and not set(args.split_reads.split(",")) <= {"auto", "threads"}:
        ap.error(f"--split-reads {args.split_reads}: each one of auto, threads")
    forced = None
    if replay:
        prompts, forced = replay_texts(args.workload, args.model, limit=args.prompts,
                                       max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens)
    else:
        prompts = load_prompts(args.workload, args.model, limit=args.prompts, max_prompt_tokens=args.max_prompt_tokens)
    from chronos_mlx.loader import plan_model

    info = plan_model(args.model, args.dtype).info
    setup, routing = None, {"routing": "model"}
    if args.routing == "trained":
        from chronos_mlx.bench_routing import calibrate_for_workload, routing_setup

        params = calibrate_for_workload(args.workload, prompts, forced, info["num_experts"], info["top_k"],
                                        limit=args.prompts, max_prompt_tokens=args.max_prompt_tokens,
                                        max_tokens=args.max_tokens)
        if any(v.partition(":")[2] == "table" for v in args.modes.split(",")):
            # Guesses as good as the demo's gate predictor on the same text (bench_guesses.py).
            from chronos_mlx.bench_guesses import calibrate_guesses_for_workload

            params = calibrate_guesses_for_workload(params, args.workload, prompts, forced, info["top_k"],
                                                    limit=args.prompts, max_prompt_tokens=args.max_prompt_tokens,
                                                    max_tokens=args.max_tokens)
            print(f"  guesses: noise {params.guess_noise:.3f}; next-layer recall@{info['top_k']} demo gate / here: "
                  f"{params.guess_recall['demo']:.3f} / {params.guess_recall['fitted']:.3f}", file=sys.stderr, flush=True)
        setup, routing = routing_setup(params), {"routing": "trained", **asdict(params)}
        print(f"  routing: popularity exponent {params.alpha:.3f}; LRU decode hit demo / here: "
              + ", ".join(f"{b}: {params.targets[b]:.3f} / {params.fitted[b]:.3f}" for b in params.targets),
              file=sys.stderr, flush=True)
    probe = None
    if not args.no_probe:
        from chronos_mlx.probe import format_probe, probe_read_bandwidth

        probe = probe_read_bandwidth(info["path"], info.get("bytes_per_expert_on_disk") or info["bytes_per_expert"])
        print("  " + format_probe(probe), file=sys.stderr, flush=True)
    configs = [BenchConfig(RESIDENT, kind=RESIDENT, setup=setup)]
    for b in args.budgets.split(","):
        for variant in args.modes.split(","):
            for policy in args.policies.split(","):
                mode, _, predictor = variant.partition(":")
                opts = {"io_sim": args.io_sim} if args.io_sim else {}
                if predictor:
                    opts["predictor"] = predictor
                name = f"chronos-{variant}@{b}"
                opts["policy"] = policy
                if policy != "usage":  # rows without a suffix: the default policy
                    name = f"chronos-{variant}-{policy}@{b}"
                cfg_setup = setup
                if mode == "per-layer-stop":  # per-layer routing that stops graph construction at each layer (before gates)
                    mode, cfg_setup = "per-layer", _with_runtime(setup, pipelined=False, late_rows=False)
                elif mode.endswith("-gates"):  # per-layer routing through gates where late rows are the default
                    mode, cfg_setup = mode[: -len("-gates")], _with_runtime(setup, late_rows=False)
                elif mode.endswith("-rows"):  # late rows where gates are the default (GPUs)
                    mode, cfg_setup = mode[: -len("-rows")], _with_runtime(setup, late_rows=True)
                for guesses, reads in itertools.product(
                        args.guesses.split(",") if predictor and args.guesses else [None],
                        args.guess_reads.split(",") if predictor and mode == "device-wait" and args.guess_reads else [None]):
                    for threads in (args.io_threads.split(",") if args.io_threads else [None]):
                        for split in (args.split_reads.split(",") if args.split_reads else [None]):
                            label = name if guesses is None else f"{name}-g{guesses}"
                            label = label if reads is None else f"{label}-{reads}"
                            o = dict(opts)
                            if threads is not None:
                                label, o["io_threads"] = f"{label}-t{threads}", int(threads)
                            if split is not None:
                                label, o["split_reads"] = f"{label}-{split}", split
                            configs.append(BenchConfig(label, budget=b, sync=mode, options=o,
                                                       setup=_with_guesses(cfg_setup, guesses, reads)))
    rows = []
    clock = PhaseClock(info["model_type"]) if args.phases else None
    if args.interleave:
        rows = measure_interleaved(configs, args.model, prompts, max_tokens=args.max_tokens,
                                   repeats=args.repeats, dtype=args.dtype, forced=forced, temp=args.temp,
                                   profilers={c.name: clock.of(c.name) for c in configs} if clock else None)
        for got in rows if clock is not None else []:
            got["phases_ms_per_token"] = clock.take(got["name"], got.get("decode_tokens_per_s"))
            print(f"  phases {got['name']}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in got["phases_ms_per_token"].items()),
                  file=sys.stderr, flush=True)
    else:
        for cfg in configs:
            prof = None
            if clock is not None:
                import chronos_mlx.bench

                chronos_mlx.bench.DECODE_PROFILER = clock.of(cfg.name)
            elif args.profile:
                import cProfile

                import chronos_mlx.bench

                prof = chronos_mlx.bench.DECODE_PROFILER = cProfile.Profile()  # decode steps only
            rows.append(measure(cfg, args.model, prompts, max_tokens=args.max_tokens, repeats=args.repeats, dtype=args.dtype,
                                forced=forced, temp=args.temp))
            if prof is not None:
                chronos_mlx.bench.DECODE_PROFILER = None
                _print_profile(prof, cfg.name, args.profile)
            got = rows[-1]
            if clock is not None:
                got["phases_ms_per_token"] = clock.take(cfg.name, got.get("decode_tokens_per_s"))
                print(f"  phases {cfg.name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in got["phases_ms_per_token"].items()),
                      file=sys.stderr, flush=True)
            print(f"  measured {cfg.name}: " + (f"FAILED ({got['error']})" if got.get("error") else
                                                f"{got['decode_tokens_per_s']:.1f} tok/s"), file=sys.stderr, flush=True)
        # The ceiling again at the end: drift between first and last shows the noise floor.
        if clock is not None:
            import chronos_mlx.bench

            chronos_mlx.bench.DECODE_PROFILER = None
        rows.append(measure(BenchConfig(RESIDENT + "-again", kind=RESIDENT, setup=setup), args.model, prompts,
                            max_tokens=args.max_tokens, repeats=args.repeats, dtype=args.dtype, forced=forced,
                            temp=args.temp))
    if trace is not None:
        Path(args.planner_trace).write_text(json.dumps(trace))
    decoding = "replay" if replay else f"temp={args.temp}" if args.temp else "greedy"
    out = report(rows, probe=probe, command=" ".join(sys.argv), io_sim=args.io_sim, max_tokens=args.max_tokens,
                 decoding=decoding, routing=routing)
    cols = ["name", "decode_tokens_per_s", "ratio_to_resident", "paired_ratio_to_resident", "paired_ratio_to_resident_min",
            "paired_ratio_to_resident_max", "roofline_tokens_per_s", "ratio_to_roofline",
            "host_syncs_per_token", "recompute_rate", "recomputed_layers_per_token", "recomputed_rows_per_token",
            "decode_hit_rate", "stall_s_per_token", "sync_wait_s_per_token", "recovery_wait_s_per_token",
            "decode_bytes_read_per_token", "belady_decode_bytes_read_per_token",
            "effective_load_bytes_per_s", "load_rate_to_roofline", "decode_misses_per_token",
            "prefetch_hits_per_token", "device_waits_per_token", "staged_guesses_used_per_token",
            "posts_taken_per_token",
            "prediction_recall", "mlx_peak_memory_bytes", "error"] + (["phases_ms_per_token"] if args.phases else [])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in out["results"]:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, dict):  # phases: forward / async_eval / eval / rest, ms a token
                v = " / ".join(f"{x:.2f}" for x in v.values())
            cells.append("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
    save_json(args.json, out, indent=2)


if __name__ == "__main__":
    main()
