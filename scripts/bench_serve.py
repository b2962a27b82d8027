#!/usr/bin/env python
"""Aggregate decode throughput of `chronos serve`'s batch engine vs stock mlx_lm.

For each configuration (stock mlx_lm resident, chronos at each budget) and each concurrency
(how many requests arrive together), N requests with different prompts (mixed workloads:
English, Python, C, German, French, Spanish, Italian) are submitted at once to a
`BatchEngine` (mlx_lm's BatchGenerator on the model: the engine `chronos serve` runs; the
stock rows are the same engine on stock `mlx_lm.load`, i.e. what mlx_lm.server's batching
does, without HTTP on either side). Reported per run:

- aggregate decode tokens/s: generated tokens after each request's first / (time of the last
  token - time of the first request's first token);
- end-to-end tokens/s: all generated tokens / wall time from submission (prefill included);
- expert bytes read per generated token and the decode hit rate (chronos), and the mean
  decode batch size;
- whether every greedy sequence equals the stock engine's for the same arrival (checked
  when --check).

All configurations are loaded together and measured round-robin for each (concurrency,
repeat); the table gives the median over repeats.

Example (the README's figures):
    python scripts/bench_serve.py --budgets 1.0,0.5,0.25 --concurrency 1,4,16 --max-tokens 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import mlx.core as mx

WORKLOAD_ORDER = ("en", "python", "c", "de", "fr", "es", "it")


def prompts_for(tokenizer, n: int, max_prompt_tokens: int) -> list:
    from chronos_mlx.workloads import read_prompts

    pools = [read_prompts(w, split="heldout") for w in WORKLOAD_ORDER]
    out, i = [], 0
    while len(out) < n:
        pool = pools[i % len(pools)]
        text = pool[(i // len(pools)) % len(pool)]
        out.append(tokenizer.encode(text)[:max_prompt_tokens])
        i += 1
    return out


def run_batch(engine, prompts, max_tokens, runtime=None):
    from chronos_mlx.serve import SamplingParams

    before = runtime.cache_totals() if runtime is not None and runtime.cache is not None else None
    steps0 = len(engine.batch_sizes)
    t0 = time.perf_counter()
    handles = [engine.submit(p, SamplingParams(max_tokens=max_tokens)) for p in prompts]
    tokens, firsts, lasts = [], [], []
    for h in handles:
        seq = []
        for ev in h.events():
            if ev.token is not None:
                seq.append(ev.token)
                now = time.perf_counter()
                if len(seq) == 1:
                    firsts.append(now)
                lasts.append(now)
        tokens.append(seq)
    t_end = time.perf_counter()
    generated = sum(len(s) for s in tokens)
    decode_tokens = generated - len([s for s in tokens if s])
    window = max(lasts) - min(firsts) if firsts else 0.0
    sizes = engine.batch_sizes[steps0:]
    row = {
        "requests": len(prompts),
        "generated_tokens": generated,
        "wall_s": t_end - t0,
        "decode_window_s": window,
        "aggregate_decode_tokens_per_s": decode_tokens / window if window else 0.0,
        "end_to_end_tokens_per_s": generated / (t_end - t0),
        "mean_batch": sum(sizes) / len(sizes) if sizes else 0.0,
        "max_batch": max(sizes) if sizes else 0,
        "ttft_s_max": (max(firsts) - t0) if firsts else None,
    }
    if before is not None:
        after = runtime.cache_totals()
        d = {k: after[k] - before[k] for k in after}
        row.update(
            bytes_read=d["bytes_read"],
            bytes_read_per_token=d["bytes_read"] / generated if generated else 0.0,
            misses=d["misses"],
            hit_rate=d["hits"] / (d["hits"] + d["misses"]) if d["hits"] + d["misses"] else 1.0,
        )
    return row, tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path or repo (default: the embedded demo model)")
    ap.add_argument("--budgets", default="1.0,0.5,0.25")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--prefill-step-size", type=int, default=256)
    ap.add_argument("--io-sim", default=None, help="simulated SSD for chronos reads, e.g. bandwidth=5GB/s,latency=80us")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock mlx_lm rows")
    ap.add_argument("--check", action="store_true", help="check every chronos sequence equals stock's (greedy)")
    ap.add_argument("--json", default=None, help="write all figures to this file")
    args = ap.parse_args(argv)

    import mlx_lm

    import chronos_mlx
    from chronos_mlx.loader import resolve_model_path
    from chronos_mlx.serve import BatchEngine

    path = resolve_model_path(args.model)
    dtype = mx.float32 if mx.default_device() == mx.cpu else None
    conc = [int(c) for c in args.concurrency.split(",")]
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    rows, reference = [], {}

    # Every configuration is loaded at once (each with its engine) and measured round-robin
    # per (concurrency, repeat), so drift of a shared machine hits all of them alike.
    configs = []  # (name, engine, runtime, tokenizer)
    if not args.no_stock:
        model, tok = mlx_lm.load(str(path))
        if dtype is not None:
            model.set_dtype(dtype)
        configs.append(("mlx_lm resident", BatchEngine(model, tok, None, prefill_step_size=args.prefill_step_size), None, tok))
    for b in budgets:
        model, tok, runtime = chronos_mlx.load(str(path), b, dtype="float32" if dtype is not None else None, io_sim=args.io_sim)
        configs.append((f"chronos {b}", BatchEngine(model, tok, runtime, prefill_step_size=args.prefill_step_size), runtime, tok))
    try:
        for name, engine, runtime, tok in configs:
            engine.start()
            prompts_all = prompts_for(tok, max(conc), args.max_prompt_tokens)
            run_batch(engine, prompts_all[:2], 4, runtime)  # warm-up
        for c in conc:
            for rep in range(args.repeats):
                for name, engine, runtime, tok in configs:
                    row, toks = run_batch(engine, prompts_all[:c], args.max_tokens, runtime)
                    row.update(config=name, concurrency=c, repeat=rep)
                    if name == "mlx_lm resident":
                        reference[(c, rep)] = toks
                    elif args.check and (c, rep) in reference:
                        row["equals_stock"] = toks == reference[(c, rep)]
                    rows.append(row)
                    print(
                        f"{name:>18} x{c:<3} {row['aggregate_decode_tokens_per_s']:8.1f} tok/s decode "
                        f"{row['end_to_end_tokens_per_s']:8.1f} end-to-end  batch {row['mean_batch']:.1f}"
                        + (f"  read {row['bytes_read_per_token'] / 1e6:.2f} MB/tok hit {row['hit_rate']:.3f}" if "bytes_read" in row else "")
                        + (f"  equals stock: {row['equals_stock']}" if "equals_stock" in row else ""),
                        file=sys.stderr,
                    )
    finally:
        for _, engine, _, _ in configs:
            engine.stop()

    stock = {(r["concurrency"], r["repeat"]): r["aggregate_decode_tokens_per_s"] for r in rows if r["config"] == "mlx_lm resident"}
    for r in rows:
        s = stock.get((r["concurrency"], r["repeat"]))
        r["x_stock"] = r["aggregate_decode_tokens_per_s"] / s if s else None
    result = {
        "command": "python scripts/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(path),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": str(mx.default_device())},
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "max_tokens": args.max_tokens,
        "max_prompt_tokens": args.max_prompt_tokens,
        "io_sim": args.io_sim,
        "results": rows,
    }
    from statistics import median

    summary = []
    for name in dict.fromkeys(r["config"] for r in rows):
        for c in conc:
            rs = [r for r in rows if r["config"] == name and r["concurrency"] == c]
            if not rs:
                continue
            med = lambda k: median(r[k] for r in rs) if all(r.get(k) is not None for r in rs) else None  # noqa: E731
            summary.append({
                "config": name, "concurrency": c, "repeats": len(rs),
                "aggregate_decode_tokens_per_s": med("aggregate_decode_tokens_per_s"), "x_stock": med("x_stock"),
                "end_to_end_tokens_per_s": med("end_to_end_tokens_per_s"), "mean_batch": med("mean_batch"),
                "bytes_read_per_token": med("bytes_read_per_token"), "hit_rate": med("hit_rate"),
                "equals_stock": all(r["equals_stock"] for r in rs) if all("equals_stock" in r for r in rs) else None,
            })
    result["summary"] = summary
    print("| config | concurrent requests | aggregate decode tok/s | × stock | end-to-end tok/s | mean batch | read MB/token | hit rate | tokens = stock |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in summary:
        print(
            f"| {r['config']} | {r['concurrency']} | {r['aggregate_decode_tokens_per_s']:.1f} | "
            f"{(r['x_stock'] or 0):.2f} | {r['end_to_end_tokens_per_s']:.1f} | {r['mean_batch']:.1f} | "
            + (f"{r['bytes_read_per_token'] / 1e6:.2f} | {r['hit_rate']:.3f} |" if r["bytes_read_per_token"] is not None else " | |")
            + {True: " yes |", False: " **no** |", None: " |"}[r["equals_stock"]]
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
