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
    setup: object = None  # callable(model, runtime) run after loading (predictors, profiles)


def machine_info() -> dict:
    import mlx_lm

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


def _stock_run(model, prompt, max_tokens):
    from mlx_lm.generate import generate_step

    tic = time.perf_counter()
    t_first, n = None, 0
    for n, _ in enumerate(generate_step(mx.array(prompt), model, max_tokens=max_tokens), 1):
        if t_first is None:
            t_first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": t_first - tic, "decode_s": end - t_first, "decode_steps": n - 1, "prompt_tokens": len(prompt)}


def _chronos_run(model, runtime, prompt, max_tokens, sync):
    from .generate import generate_step

    runtime.reset_counters()
    for _ in generate_step(mx.array(prompt), model, runtime, max_tokens=max_tokens, sync=sync):
        pass
    c = runtime.counters
    s = runtime.stats()
    return {
        "ttft_s": c.ttft_s,
        "decode_s": c.decode_s,
        "decode_steps": c.decode_steps,
        "prompt_tokens": len(prompt),
        "stall_s": c.stall_s,
        "hits": s["hits"],
        "misses": s["misses"],
        "bytes_read": s["bytes_read"],
        "host_syncs": c.host_syncs,
        "recomputes": c.recomputes,
        "recomputed_layers": c.recomputed_layers,
        "prefetch_hits": s["prefetch_hits"],
        "prefetch_wasted_bytes": s["prefetch_wasted_bytes"],
        "prediction_recall": s["prediction_recall"],
        "generated_tokens": c.generated_tokens,
    }


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
        out.update(
            stall_s_per_token=sum(r["stall_s"] for r in runs) / max(steps, 1),
            bytes_read_per_token=sum(r["bytes_read"] for r in runs) / max(tokens, 1),
            hit_rate=hits / (hits + misses) if hits + misses else 1.0,
            host_syncs_per_token=sum(r["host_syncs"] for r in runs) / max(tokens, 1),
            recomputed_layers=sum(r["recomputed_layers"] for r in runs),
            recompute_rate=sum(r["recomputes"] for r in runs) / max(tokens, 1),
            prefetch_hits=sum(r["prefetch_hits"] for r in runs),
            prefetch_wasted_bytes=sum(r["prefetch_wasted_bytes"] for r in runs),
            prediction_recall=statistics.fmean(r["prediction_recall"] for r in runs),
        )
    return out


def _summarise(repeats: list[dict]) -> dict:
    out = {}
    for key in repeats[0]:
        values = [r[key] for r in repeats]
        out[key] = statistics.median(values)
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
        return model, None
    from . import load

    model, _, runtime = load(model_path, expert_budget=config.budget, dtype=dtype, **config.options)
    if config.setup is not None:
        config.setup(model, runtime)
    return model, runtime


def measure(config: BenchConfig, model_path, prompts, *, max_tokens=64, repeats=3, warmup=1, dtype=None, progress=None):
    """Load one configuration, warm it up and measure it; returns medians and spread."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model, runtime = _load(config, model_path, dtype)
    load_s = time.perf_counter() - t0
    results = []
    for r in range(warmup + repeats):
        runs = []
        for prompt in prompts:
            if runtime is None:
                runs.append(_stock_run(model, prompt, max_tokens))
            else:
                runs.append(_chronos_run(model, runtime, prompt, max_tokens, config.sync))
            if progress:
                progress()
        if r >= warmup:
            results.append(_aggregate(runs))
    out = {"name": config.name, "kind": config.kind, "load_s": load_s, **_summarise(results)}
    if runtime is not None:
        out.update(
            budget=config.budget,
            sync=config.sync,
            slots_per_layer=runtime.info["slots_per_layer"] if runtime.cache else None,
            budget_fraction=runtime.info.get("budget_fraction", 1.0),
            expert_budget_bytes=runtime.info.get("expert_budget_bytes", 0),
            direct_io=bool(runtime.reader and runtime.reader.direct_io_active),
            **{k: v for k, v in config.options.items() if isinstance(v, (str, int, float, bool))},
        )
    out["mlx_peak_memory_bytes"] = mx.get_peak_memory()
    del model, runtime
    gc.collect()
    mx.clear_cache()
    return out


def add_ratios(rows: list[dict]) -> list[dict]:
    """Decode speed as a ratio to stock mlx_lm with everything resident, when it was measured."""
    ceiling = next((r["decode_tokens_per_s"] for r in rows if r["name"] == RESIDENT), None)
    for r in rows:
        r["ratio_to_resident"] = r["decode_tokens_per_s"] / ceiling if ceiling else None
    return rows


def report(rows: list[dict], **extra) -> dict:
    return {"machine": machine_info(), **extra, "results": add_ratios(rows)}


__all__ = ["BenchConfig", "measure", "report", "machine_info", "RESIDENT", "MMAP", "asdict"]
