"""Side-by-side decode benchmarks: stock mlx_lm and chronos configurations in one process.

Every configuration decodes the same prompts greedily; each is warmed up, then measured
`repeats` times, and the median and spread are reported along with the ratio to stock
mlx_lm with the whole model resident (the speed ceiling). Speed is never asserted in a
test: this module only measures.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np

RESIDENT = "mlx_lm-resident"
MMAP = "mlx_lm-mmap"


@dataclass
class BenchConfig:
    """One thing to measure: stock mlx_lm, or chronos with some options."""

    name: str
    kind: str = "chronos"  # RESIDENT, MMAP or "chronos"
    budget: str = "1.0"
    sync: str = "optimistic"
    options: dict = field(default_factory=dict)  # extra chronos_mlx.load keyword arguments
    setup: object = None  # callable(model, runtime) run after loading; stock configurations get runtime=None
    profile: object = None  # a profile name or path to apply after loading


def machine_info() -> dict:
    import mlx_lm

    from .shards import split_read_path
    from .upload import expert_write_path

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "python": sys.version.split()[0],
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "expert_writes": expert_write_path(),
        "split_reads": split_read_path(),
    }
    try:
        info["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


# --- forced decoding ("replay") and sampling -------------------------------------------


def position_cache(prompt_cache):
    """The last cache object whose integer `offset` counts the tokens processed so far.

    Hybrid models also hold caches without one (ArraysCache for linear attention); nested
    CacheLists are searched. The last layer's cache is the one to read: at sampler-call
    time it has always just been advanced by this step (a recomputation after a miss
    reruns the layers from the first missed one to the last, while the caches of the
    layers below may be rolled back and kept), so its offset is the position of the token
    being chosen, also when chronos recomputes a step."""
    found = None
    stack = list(prompt_cache)
    while stack:
        c = stack.pop(0)
        if type(getattr(c, "offset", None)) is int:
            found = c
        inner = getattr(c, "caches", None)
        if isinstance(inner, (list, tuple)):
            stack[:0] = list(inner)
    if found is None:
        raise ValueError("replay needs a cache object with an integer offset; this model's prompt cache has none")
    return found


class ReplaySampler:
    """A sampler that ignores the logprobs and returns the text's token at the current position.

    `tokens` is the whole text (prompt then continuation); the position is read from
    `position_cache(prompt_cache)` when the sampler is called, never counted, so a decode
    step that is recomputed after a miss returns the same token. Past the text's end it
    falls back to greedy."""

    def __init__(self, tokens, prompt_cache):
        self.tokens = [int(t) for t in tokens]
        self.cache = position_cache(prompt_cache)

    def __call__(self, logprobs):
        pos = self.cache.offset
        if pos < len(self.tokens):
            return mx.array([self.tokens[pos]] * (logprobs.shape[0] if logprobs.ndim > 1 else 1), dtype=mx.uint32)
        return mx.argmax(logprobs, axis=-1)


def _decoding(model, prompt, forced, temp):
    """(prompt_cache, sampler) for one run: replay of `forced`, sampling at `temp`, or greedy."""
    from mlx_lm.models.cache import make_prompt_cache

    prompt_cache = make_prompt_cache(model)
    routing = getattr(model, "_chronos_bench_routing", None)
    if routing is not None:  # trained-like routing: this text's rows, by position
        routing.set_sequence(list(prompt) + list(forced or []))
    if forced is not None:
        return prompt_cache, ReplaySampler(list(prompt) + list(forced), prompt_cache)
    if temp:
        from mlx_lm.sample_utils import make_sampler

        return prompt_cache, make_sampler(temp=float(temp))
    return prompt_cache, None


def replay_texts(workload, model=None, *, limit=None, max_prompt_tokens=128, max_tokens=64, split="heldout",
                 tokenizer=None) -> tuple[list, list]:
    """(prompts, continuations) cut from a workload's own texts for forced decoding.

    Each text gives a prompt (its first tokens, at most `max_prompt_tokens`) and the
    `max_tokens` tokens that follow it in the text (fewer when the text is short)."""
    from .workloads import load_prompts

    prompts, continuations = [], []
    for ids in load_prompts(workload, model, limit=limit, split=split, tokenizer=tokenizer):
        ids = [int(t) for t in ids]
        n_prompt = max(1, min(max_prompt_tokens, len(ids) - max_tokens))
        prompts.append(ids[:n_prompt])
        continuations.append(ids[n_prompt:n_prompt + max_tokens])
    return prompts, continuations


def _mlx_lm_decode(model, prompt, max_tokens, forced, temp, on_first=None) -> tuple:
    """Stock mlx_lm's decode loop over `prompt`: (tokens, start, first token's time, end, steps).
    `on_first()` runs at the first token, when the decode figures (and DECODE_PROFILER) start."""
    from mlx_lm.generate import generate_step

    prompt_cache, sampler = _decoding(model, prompt, forced, temp)
    tic = time.perf_counter()
    t_first, n, tokens = None, 0, []
    prof = DECODE_PROFILER
    try:
        for n, (tok, _) in enumerate(generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=sampler,
                                                   prompt_cache=prompt_cache), 1):
            if t_first is None:
                t_first = time.perf_counter()
                if on_first is not None:
                    on_first()
                if prof is not None:
                    prof.enable()
            tokens.append(int(tok))
    finally:
        if prof is not None:
            prof.disable()
    return tokens, tic, t_first, time.perf_counter(), n - 1


def _stock_run(model, prompt, max_tokens, forced=None, temp=None):
    tokens, tic, t_first, end, steps = _mlx_lm_decode(model, prompt, max_tokens, forced, temp)
    return {"ttft_s": t_first - tic, "decode_s": end - t_first, "decode_steps": steps, "prompt_tokens": len(prompt),
            "tokens": tokens}


# A chronos model driven by stock mlx_lm's own decode loop (per-layer routing: exact under
# any caller): what a user of `mlx_lm.generate` on a `chronos_mlx.load`ed model gets.
PLAIN = "mlx_lm"
WHOLE_TOKEN = "whole-token"  # optimistic with no segment end: one host read a step (a bench mode)


def _plain_run(model, runtime, prompt, max_tokens, forced=None, temp=None):
    runtime.reset_counters()
    marks = []

    def at_first():  # decode-only figures start here, like chronos's loop
        marks.append((runtime.cache_totals(), runtime.counters.io_wait_s, runtime.layer_syncs,
                      runtime.counters.sync_wait_s, runtime.counters.recomputed_rows))

    tokens, tic, t_first, end, steps = _mlx_lm_decode(model, prompt, max_tokens, forced, temp, at_first)
    first = marks[0]
    after, s = runtime.cache_totals(), runtime.stats()
    d = {k: after[k] - first[0][k] for k in after}
    return {
        "tokens": tokens, "ttft_s": t_first - tic, "decode_s": end - t_first, "decode_steps": steps,
        "prompt_tokens": len(prompt), "stall_s": runtime.counters.io_wait_s - first[1],
        "sync_wait_s": runtime.counters.sync_wait_s - first[3], "recovery_wait_s": 0.0,
        "hits": s["hits"], "misses": s["misses"], "bytes_read": s["bytes_read"],
        # Per-layer reads (+ the sampled token) per generated token, like the decode loop counts.
        "host_syncs": runtime.layer_syncs + len(tokens), "recomputes": 0, "recomputed_layers": 0,
        "recomputed_rows": runtime.counters.recomputed_rows - first[4],
        "prefetch_hits": s["prefetch_hits"], "decode_hits": d["hits"], "decode_misses": d["misses"],
        "decode_bytes_read": d["bytes_read"], "decode_prefetch_hits": d["prefetch_hits"],
        "prefetch_wasted_bytes": s["prefetch_wasted_bytes"], "prediction_recall": s["prediction_recall"],
        "generated_tokens": len(tokens),
    }


# A cProfile.Profile or anything with enable() / disable() (scripts/bench_sync.py --profile,
# --phases): every run enables it for its decode steps only (after the first token), so a
# profile is not buried under loading and prefill.
DECODE_PROFILER = None


def _chronos_run(model, runtime, prompt, max_tokens, sync, forced=None, temp=None):
    from .generate import generate_step

    if sync == PLAIN:
        return _plain_run(model, runtime, prompt, max_tokens, forced, temp)
    prompt_cache, sampler = _decoding(model, prompt, forced, temp)
    runtime.reset_counters()
    tokens = []
    prof = DECODE_PROFILER
    try:
        ends = frozenset() if sync == WHOLE_TOKEN else None
        for tok, _ in generate_step(mx.array(prompt), model, runtime, max_tokens=max_tokens,
                                    sync="optimistic" if sync == WHOLE_TOKEN else sync, sampler=sampler,
                                    prompt_cache=prompt_cache, segment_ends=ends):
            if prof is not None and not tokens:
                prof.enable()
            tokens.append(int(tok))
    finally:
        if prof is not None:
            prof.disable()
    c = runtime.counters
    s = runtime.stats()
    return {
        "tokens": tokens,
        "ttft_s": c.ttft_s,
        "decode_s": c.decode_s,
        "decode_steps": c.decode_steps,
        "prompt_tokens": len(prompt),
        "stall_s": c.stall_s,
        "sync_wait_s": c.decode_sync_wait_s,
        "recovery_wait_s": c.decode_recovery_wait_s,
        "hits": s["hits"],
        "misses": s["misses"],
        "bytes_read": s["bytes_read"],
        "host_syncs": c.host_syncs,
        "recomputes": c.recomputes,
        "recomputed_layers": c.recomputed_layers,
        "recomputed_rows": c.recomputed_rows,
        "discarded_steps": c.discarded_steps,
        "settled_first": c.settled_first,
        "device_waits": s.get("device_waits", 0),
        "staged_guess_reads": s.get("staged_guess_reads", 0),
        "staged_guesses_used": s.get("staged_guesses_used", 0),
        "posts": s.get("posts", 0),
        "posts_taken": s.get("posts_taken", 0),
        "prefetch_hits": s["prefetch_hits"],
        "decode_hits": c.decode_hits,
        "decode_misses": c.decode_misses,
        "decode_bytes_read": c.decode_bytes_read,
        "decode_prefetch_hits": c.decode_prefetch_hits,
        "prefetch_wasted_bytes": s["prefetch_wasted_bytes"],
        "prediction_recall": s["prediction_recall"],
        "generated_tokens": c.generated_tokens,
    }


def _run_prompts(model, runtime, sync, prompts, forced, temp, max_tokens, recorder=None, progress=None) -> list:
    """One repeat of one configuration: every prompt once (stock when `runtime` is None)."""
    runs = []
    for i, prompt in enumerate(prompts):
        f = forced[i] if forced is not None else None
        if temp:
            mx.random.seed(i)
        if recorder is not None:
            recorder.mark()
        if runtime is None:
            runs.append(_stock_run(model, prompt, max_tokens, f, temp))
        else:
            runs.append(_chronos_run(model, runtime, prompt, max_tokens, sync, f, temp))
        if progress:
            progress()
    return runs


def _aggregate(runs: list[dict]) -> dict:
    """One repeat over all prompts -> the stat names `generate --json` uses."""
    steps = sum(r["decode_steps"] for r in runs)
    decode_s = sum(r["decode_s"] for r in runs)
    prompt_tokens = sum(r["prompt_tokens"] for r in runs)
    ttft = sum(r["ttft_s"] for r in runs)
    out = {
        "decode_tokens_per_s": steps / decode_s if decode_s else 0.0,
        "ttft_s": ttft / len(runs),
        "prefill_tokens_per_s": prompt_tokens / ttft if ttft else 0.0,
    }
    if "hits" in runs[0]:
        tokens = sum(r["generated_tokens"] for r in runs)
        hits, misses = sum(r["hits"] for r in runs), sum(r["misses"] for r in runs)
        d_hits, d_misses = sum(r["decode_hits"] for r in runs), sum(r["decode_misses"] for r in runs)
        out.update(
            stall_s_per_token=sum(r["stall_s"] for r in runs) / max(steps, 1),
            # Where the rest of a decode step waits: routing read back (the device computing
            # up to it) and steps thrown away after a miss.
            sync_wait_s_per_token=sum(r["sync_wait_s"] for r in runs) / max(steps, 1),
            recovery_wait_s_per_token=sum(r["recovery_wait_s"] for r in runs) / max(steps, 1),
            # Prefill and decode (comparable with Belady's bound, which sees both) ...
            bytes_read_per_token=sum(r["bytes_read"] for r in runs) / max(tokens, 1),
            hit_rate=hits / (hits + misses) if hits + misses else 1.0,
            # ... and decode alone, per decode step like the stall.
            decode_bytes_read_per_token=sum(r["decode_bytes_read"] for r in runs) / max(steps, 1),
            decode_misses_per_token=d_misses / max(steps, 1),
            decode_hit_rate=d_hits / (d_hits + d_misses) if d_hits + d_misses else 1.0,
            prefetch_hits_per_token=sum(r["decode_prefetch_hits"] for r in runs) / max(steps, 1),
            host_syncs_per_token=sum(r["host_syncs"] for r in runs) / max(tokens, 1),
            recomputed_layers=sum(r["recomputed_layers"] for r in runs),
            recomputed_layers_per_token=sum(r["recomputed_layers"] for r in runs) / max(steps, 1),
            recompute_rate=sum(r["recomputes"] for r in runs) / max(tokens, 1),
            # Late rows (per-layer routing on the CPU backend): rows recomputed after a load.
            recomputed_rows_per_token=sum(r.get("recomputed_rows", 0) for r in runs) / max(steps, 1),
            # Steps launched behind one that missed (thrown away) and steps verified before
            # the next was launched because a miss was likely.
            discarded_steps_per_token=sum(r.get("discarded_steps", 0) for r in runs) / max(tokens, 1),
            settled_first_per_token=sum(r.get("settled_first", 0) for r in runs) / max(tokens, 1),
            device_waits_per_token=sum(r.get("device_waits", 0) for r in runs) / max(tokens, 1),
            # Device-wait guesses read into staging after an answer (preread.py), and those a load used.
            staged_guess_reads_per_token=sum(r.get("staged_guess_reads", 0) for r in runs) / max(tokens, 1),
            staged_guesses_used_per_token=sum(r.get("staged_guesses_used", 0) for r in runs) / max(tokens, 1),
            posts_per_token=sum(r.get("posts", 0) for r in runs) / max(tokens, 1),
            posts_taken_per_token=sum(r.get("posts_taken", 0) for r in runs) / max(tokens, 1),
            prefetch_hits=sum(r["prefetch_hits"] for r in runs),
            prefetch_wasted_bytes=sum(r["prefetch_wasted_bytes"] for r in runs),
            prediction_recall=_mean_known(r["prediction_recall"] for r in runs),
        )
    return out


def _mean_known(values):
    """The mean of the values that are not None (None if all are: e.g. recall without a predictor)."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _summarise(repeats: list[dict]) -> dict:
    out = {}
    for key in repeats[0]:
        values = [r[key] for r in repeats if r[key] is not None]
        out[key] = statistics.median(values) if values else None
        if key == "decode_tokens_per_s":
            out["decode_tokens_per_s_min"] = min(values)
            out["decode_tokens_per_s_max"] = max(values)
    return out


def _load(config: BenchConfig, model_path, dtype):
    from mlx_lm import load as stock_load

    from . import loader

    if config.kind in (RESIDENT, MMAP):
        model, _ = stock_load(str(loader.resolve_model_path(model_path)), lazy=config.kind == MMAP)
        target = loader.compute_dtype(dtype)
        if target is not None:
            model.set_dtype(target)
        if config.kind == RESIDENT:
            mx.eval(model.parameters())
        if config.setup is not None:  # the same setup as chronos gets (e.g. trained-like routing)
            config.setup(model, None)
        return model, None
    from . import load

    options = dict(config.options)
    predictor = options.pop("predictor", None)
    model, _, runtime = load(model_path, expert_budget=config.budget, dtype=dtype, **options)
    if predictor and predictor != "table":
        from .predict_runtime import attach_predictor

        attach_predictor(model, runtime, predictor)
    if config.profile:
        from .profiles import apply_profile, load_profile

        apply_profile(runtime, model, load_profile(config.profile)).join()
    if predictor == "table":
        runtime.guesses = runtime.info["top_k"]  # as attach_predictor does (a setup may change it)
    if config.setup is not None:
        config.setup(model, runtime)
    if predictor == "table":  # guesses of trained-like routing, blurred to a trained model's recall
        from .bench_guesses import TableGuesses

        params = getattr(config.setup, "params", None)
        if params is None or params.guess_noise is None:
            raise ValueError("predictor 'table' needs trained-like routing with a calibrated guess noise")
        runtime.predictor = TableGuesses(model._chronos_bench_routing, params.guess_noise)
    return model, runtime


def failed_row(config: BenchConfig, error: BaseException) -> dict:
    """The row of a configuration that failed while it was measured (a runtime error in its
    decoding, e.g. device-wait's kernel giving up): its name and why, no figures. The other
    configurations are still measured and reported."""
    return {"name": config.name, "kind": config.kind, "budget": config.budget, "sync": config.sync,
            "decode_tokens_per_s": None, "error": f"{type(error).__name__}: {error}"}


def measure(config: BenchConfig, model_path, prompts, *, max_tokens=64, repeats=3, warmup=1, dtype=None, progress=None,
            forced=None, temp=None):
    """Load one configuration, warm it up and measure it; returns medians and spread.

    forced: per prompt, the tokens to decode after it (replay: forced decoding of a
    text, see `replay_texts`); temp: sample at this temperature instead of greedy.
    A RuntimeError while it runs gives its `failed_row` (user errors still raise)."""
    try:
        return _measure(config, model_path, prompts, max_tokens=max_tokens, repeats=repeats, warmup=warmup,
                        dtype=dtype, progress=progress, forced=forced, temp=temp)
    except RuntimeError as e:
        gc.collect()
        mx.clear_cache()
        return failed_row(config, e)


def _measure(config: BenchConfig, model_path, prompts, *, max_tokens, repeats, warmup, dtype, progress, forced, temp):
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model, runtime = _load(config, model_path, dtype)
    load_s = time.perf_counter() - t0
    recorder = _recorder(runtime)  # the routing, for Belady's bound at this budget
    results = []
    start = initial = None
    for r in range(warmup + repeats):
        if r == warmup and recorder is not None:  # Belady starts where the measured runs start
            start = {l: len(seq) for l, seq in recorder.sequences.items()}
            initial = _resident_sets(runtime)
        runs = _run_prompts(model, runtime, config.sync, prompts, forced, temp, max_tokens, recorder, progress)
        if r >= warmup:
            results.append(_aggregate(runs))
    out = {"name": config.name, "kind": config.kind, "load_s": load_s, **_summarise(results),
           "decoding": "replay" if forced is not None else f"temp={temp}" if temp else "greedy"}
    if recorder is not None:
        out.update(_belady(recorder, start, initial, runtime, repeats * len(prompts), max_tokens))
    if runtime is not None:
        _load_rate(out, runtime)
        out.update(_chronos_fields(config, runtime))
    out["mlx_peak_memory_bytes"] = mx.get_peak_memory()
    del model, runtime
    gc.collect()
    mx.clear_cache()
    return out


def _chronos_fields(config: BenchConfig, runtime) -> dict:
    """What a chronos row says of its configuration: budget, routing, options, what took effect."""
    out = dict(
        budget=config.budget,
        sync=config.sync,
        slots_per_layer=runtime.info.get("slots_per_layer") if runtime.cache else None,
        budget_fraction=runtime.info.get("budget_fraction", 1.0),
        expert_budget_bytes=runtime.info.get("expert_budget_bytes", 0),
        **{k: v for k, v in config.options.items() if isinstance(v, (str, int, float, bool))},
    )
    out["direct_io"] = bool(runtime.reader and runtime.reader.direct_io_active)  # what took effect
    if runtime.cache is not None:  # CUDA: what the copy engine wrote, and why it stopped if it did
        stats = runtime.stats()
        out["device_copy_bytes"] = stats["device_copy_bytes"]
        out["device_copy_error"] = stats["device_copy_error"]
    return out


def _recorder(runtime):
    """An AccessRecorder on a runtime whose cache can miss (None when everything is resident)."""
    if runtime is None or runtime.cache is None or all(L.full for L in runtime.cache.layers):
        return None
    recorder = AccessRecorder()
    runtime.observers.append(recorder)
    return recorder


def _belady(recorder, start, initial, runtime, runs: int, max_tokens: int) -> dict:
    """Belady's bytes per token over the measured runs (all, and decode alone), and the
    bound the simulated drive puts on decoding with an oracle cache."""
    slots = runtime.cache.num_slots
    loads = decode_loads = 0
    for layer, seq in recorder.sequences.items():
        first = start.get(layer, 0)
        steps = belady_loads(seq[first:], slots, initial[layer], per_step=True)
        loads += sum(steps)
        prefill = recorder.prefill_steps(layer)
        decode_loads += sum(n for j, n in enumerate(steps, first) if j not in prefill)
    per_expert = runtime.cache.bytes_on_disk_per_expert
    out = {
        "belady_bytes_read_per_token": loads * per_expert / (runs * max_tokens),
        # Decode alone, per decode step (each run's first token comes from the prefill).
        "belady_decode_bytes_read_per_token": decode_loads * per_expert / (runs * max(max_tokens - 1, 1)),
    }
    sim = runtime.reader.simulator if runtime.reader is not None else None
    if sim is not None:
        # Even an oracle cache must read this much: decode can't beat bandwidth / bytes.
        per_token = out["belady_bytes_read_per_token"]
        out["io_bound_tokens_per_s"] = sim.bandwidth / per_token if per_token else None
    return out


def _resident_sets(runtime) -> list:
    return [set(np.flatnonzero(L.slot_of >= 0).tolist()) for L in runtime.cache.layers]


def _load_rate(row: dict, runtime) -> None:
    """Chronos's effective load rate: decode bytes read per second stalled; and the
    simulated drive's bandwidth when --io-sim is on (the roofline then uses it)."""
    stall, read = row.get("stall_s_per_token"), row.get("decode_bytes_read_per_token")
    row["effective_load_bytes_per_s"] = read / stall if stall and read else None
    sim = runtime.reader.simulator if runtime.reader is not None else None
    if sim is not None:
        row["io_sim_bandwidth_bytes_per_s"] = sim.bandwidth


def measure_interleaved(configs, model_path, prompts, *, max_tokens=64, repeats=5, warmup=1, dtype=None,
                        forced=None, temp=None, profilers=None, progress=None):
    """All configurations loaded at once and measured round-robin, repeat by repeat.

    On a machine with other load, drift then hits every configuration alike, so ratios
    between them stay meaningful (memory figures are not separable this way). Each round
    starts one configuration further on, so none always runs right after the same one, and
    each chronos row also gets its speed over stock's of the same round, round by round
    (`paired_ratio_to_resident`, its median; `_min` / `_max`, the spread): on a GPU host whose
    speed moves by a tenth between runs, pairing is what makes one run's ratio a figure.
    `profilers`: configuration name -> its DECODE_PROFILER while its measured runs decode;
    `progress`: called after each prompt of each run, as `measure`'s."""
    global DECODE_PROFILER
    loaded = [(cfg, *_load(cfg, model_path, dtype)) for cfg in configs]
    per_config = {cfg.name: [] for cfg in configs}
    recorders = {cfg.name: _recorder(runtime) for cfg, _, runtime in loaded}
    marks, failed = {}, {}
    for r in range(warmup + repeats):
        turn = r % len(loaded) if loaded else 0
        for cfg, model, runtime in loaded[turn:] + loaded[:turn]:
            if cfg.name in failed:  # a runtime error: it is reported, the others go on
                continue
            recorder = recorders[cfg.name]
            if r == warmup and recorder is not None:
                marks[cfg.name] = ({l: len(seq) for l, seq in recorder.sequences.items()}, _resident_sets(runtime))
            if profilers is not None:
                DECODE_PROFILER = profilers.get(cfg.name) if r >= warmup else None
            try:
                runs = _run_prompts(model, runtime, cfg.sync, prompts, forced, temp, max_tokens, recorder, progress)
            except RuntimeError as e:
                failed[cfg.name] = failed_row(cfg, e)
                continue
            finally:
                if profilers is not None:
                    DECODE_PROFILER = None
            if r >= warmup:
                per_config[cfg.name].append({**_aggregate(runs), "round": r})
    stock = {m["round"]: m["decode_tokens_per_s"] for m in per_config.get(RESIDENT, [])}
    rows = []
    for cfg, model, runtime in loaded:
        if cfg.name in failed:
            rows.append(failed[cfg.name])
            continue
        measured = per_config[cfg.name]
        paired = [m["decode_tokens_per_s"] / stock[m["round"]] for m in measured
                  if stock.get(m["round"]) and m["decode_tokens_per_s"] is not None]
        row = {"name": cfg.name, "kind": cfg.kind, **_summarise([{k: v for k, v in m.items() if k != "round"}
                                                                 for m in measured]),
               "decoding": "replay" if forced is not None else f"temp={temp}" if temp else "greedy"}
        if paired and cfg.name != RESIDENT:
            row.update(paired_ratio_to_resident=statistics.median(paired), paired_ratio_to_resident_min=min(paired),
                       paired_ratio_to_resident_max=max(paired), paired_rounds=len(paired))
        if runtime is not None:
            if recorders[cfg.name] is not None:
                row.update(_belady(recorders[cfg.name], *marks[cfg.name], runtime, repeats * len(prompts), max_tokens))
            _load_rate(row, runtime)
            row.update(_chronos_fields(cfg, runtime))
        rows.append(row)
    return rows


def add_ratios(rows: list[dict], probe: dict | None = None) -> list[dict]:
    """Decode speed as a ratio to stock mlx_lm with everything resident, when it was measured;
    and beside each chronos row the I/O roofline: min(resident tokens/s, load rate ÷ decode
    bytes read per token), the load rate being the probe's best (or --io-sim's bandwidth)."""
    ceiling = next((r["decode_tokens_per_s"] for r in rows if r["name"] == RESIDENT), None)
    best = (probe or {}).get("best_bytes_per_s")
    for r in rows:
        speed = r.get("decode_tokens_per_s")
        r["ratio_to_resident"] = speed / ceiling if ceiling and speed is not None else None
        if r.get("kind") != "chronos" or speed is None:  # a failed configuration has no figures
            continue
        rate = r.get("io_sim_bandwidth_bytes_per_s") or best
        read = r.get("decode_bytes_read_per_token")
        if r.get("sync") == "device-fetch" and ceiling and read:
            # The device copies while no host thread waits: its stall is the time a token takes
            # beyond stock's (everything it adds counted as loading: a lower bound on the rate).
            excess = max(0.0, 1 / speed - 1 / ceiling) if speed else None
            r["stall_s_per_token"] = excess
            r["effective_load_bytes_per_s"] = read / excess if excess else None
        if rate:
            r["roofline_load_bytes_per_s"] = rate
            if r.get("effective_load_bytes_per_s"):
                r["load_rate_to_roofline"] = r["effective_load_bytes_per_s"] / rate
        bounds = [b for b in (ceiling, rate / read if rate and read else None) if b]
        r["roofline_tokens_per_s"] = min(bounds) if bounds else None
        r["ratio_to_roofline"] = r["decode_tokens_per_s"] / r["roofline_tokens_per_s"] if r["roofline_tokens_per_s"] else None
    return rows


def report(rows: list[dict], probe: dict | None = None, **extra) -> dict:
    return {"machine": machine_info(), **extra, **({"probe": probe} if probe else {}),
            "results": add_ratios(rows, probe)}


# --- what to compare ------------------------------------------------------------------


def fits_in_memory(info: dict, headroom: float = 0.8) -> bool:
    """Whether stock mlx_lm can hold the whole model: weights within `headroom` of RAM."""
    total = info.get("dense_bytes", 0) + info.get("expert_bytes_total", 0)
    mem = _memory_bytes()
    return not mem or total <= headroom * mem


def plan_configs(budgets, *, info: dict, io_sim=None, direct_io=False, predictor=None, profile=None,
                 policy="lru", only=None) -> tuple[list[BenchConfig], list[str]]:
    """The configurations `chronos bench` compares, and notices about skipped ones."""
    notices = []
    configs = []
    if fits_in_memory(info):
        configs.append(BenchConfig(RESIDENT, kind=RESIDENT))
    else:
        notices.append(f"{RESIDENT} skipped: the model ({(info.get('dense_bytes', 0) + info.get('expert_bytes_total', 0)) / 1e9:.1f} GB) does not fit this machine's memory")
    configs.append(BenchConfig(MMAP, kind=MMAP))
    io = {"io_sim": io_sim, "direct_io": direct_io}
    variants = [("chronos-lru", {"policy": "lru"}, None)]
    if predictor:
        variants.append(("chronos-predict", {"policy": "lru", "predictor": predictor}, None))
    else:
        notices.append("chronos-predict skipped: no --predictor given and none trained for this model")
    if profile:
        variants.append(("chronos-profile", {"policy": "usage"}, profile))
        if predictor:
            variants.append(("chronos-all", {"policy": "usage", "predictor": predictor}, profile))
    else:
        notices.append("chronos-profile skipped: no --profile given")
    if policy != "lru":
        variants.append((f"chronos-{policy}", {"policy": policy}, None))
    from . import device_wait

    if device_wait.available():  # CUDA: the same loads, layers waiting on the GPU instead of host reads
        variants.append(("chronos-device-wait", {"policy": "lru"}, None))
        from .device_fetch import MAX_HOST_SHARE

        # The shards page-locked in host memory, the device copying its own misses.
        if io_sim:
            notices.append("chronos-device-fetch skipped: it reads host memory, not a simulated drive")
        elif not fits_in_memory(info, MAX_HOST_SHARE):
            notices.append("chronos-device-fetch skipped: it locks every shard in host memory, and they do not fit")
        else:
            variants.append(("chronos-device-fetch", {"policy": "usage"}, None))
    on_device = {"chronos-device-wait": "device-wait", "chronos-device-fetch": "device-fetch"}
    for name, opts, prof in variants:
        for b in budgets:
            cfg = BenchConfig(f"{name}@{b}", budget=str(b), options={**io, **opts},
                              sync=on_device.get(name, "optimistic"))
            cfg.profile = prof
            configs.append(cfg)
    if only:
        configs = [c for c in configs if any(c.name.startswith(o) for o in only)]
    return configs, notices


# --- bounds ---------------------------------------------------------------------------


class AccessRecorder:
    """Observer that keeps each layer's sequence of used-expert sets (for Belady's bound).

    `mark()` before each generation: a layer's first observation after it is the prefill."""

    def __init__(self):
        self.sequences: dict[int, list] = {}
        self._prefill: dict[int, set] = {}
        self._seen: set = set()

    def mark(self):
        self._seen = set()

    def observe(self, layer, experts):
        seq = self.sequences.setdefault(layer, [])
        if layer not in self._seen:
            self._seen.add(layer)
            self._prefill.setdefault(layer, set()).add(len(seq))
        seq.append(frozenset(int(e) for e in experts))

    def prefill_steps(self, layer) -> set:
        return self._prefill.get(layer, set())


def belady_loads(sequence: list, slots: int, initial=(), per_step: bool = False):
    """Loads Belady's optimal eviction needs for a sequence of expert sets in `slots` slots,
    starting from the resident set `initial` (per step, as a list, with per_step=True)."""
    next_use: list[dict] = [dict() for _ in sequence]
    upcoming: dict = {}
    for t in range(len(sequence) - 1, -1, -1):
        next_use[t] = dict(upcoming)
        for e in sequence[t]:
            upcoming[e] = t
    resident: set = set(list(initial)[:slots])
    steps = []
    for t, need in enumerate(sequence):
        loads = 0
        if len(need) > slots:  # a prefill batch streamed in waves: everything absent is read
            loads += len(need - resident)
            resident = set(sorted(need, key=lambda x: next_use[t].get(x, len(sequence) + 1))[:slots])
            steps.append(loads)
            continue
        for e in need:
            if e in resident:
                continue
            loads += 1
            if len(resident) >= slots:
                evictable = resident - need
                victim = max(evictable, key=lambda x: next_use[t].get(x, len(sequence) + 1))
                resident.discard(victim)
            resident.add(e)
        steps.append(loads)
    return steps if per_step else sum(steps)


def plot(result: dict, path) -> None:
    """Decode tokens/s against budget, one line per configuration (stock as flat lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    lines: dict[str, list] = {}
    for r in result["results"]:
        if r.get("decode_tokens_per_s") is None:  # failed: in the table and the JSON, not the plot
            continue
        if r["kind"] == "chronos":
            base = r["name"].rsplit("@", 1)[0]
            lines.setdefault(base, []).append((float(r.get("budget_fraction") or r["budget"]), r["decode_tokens_per_s"]))
        else:
            ax.axhline(r["decode_tokens_per_s"], linestyle="--", linewidth=1, label=r["name"],
                       color="black" if r["kind"] == RESIDENT else "gray")
    for name, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("expert budget (fraction of all experts)")
    ax.set_ylabel("decode tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_title(result.get("title", "chronos bench"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["BenchConfig", "measure", "measure_interleaved", "replay_texts", "ReplaySampler", "position_cache", "report", "machine_info", "plan_configs", "plot", "belady_loads",
           "RESIDENT", "MMAP", "asdict"]
