#!/usr/bin/env python
"""A conversation served turn after turn: time to first token with and without the prompt cache.

Each turn's prompt is the whole conversation so far (every earlier prompt and reply) plus a new
message, as a chat client sends it. Four configurations, all in one process and measured
round-robin: stock mlx_lm (`mlx_lm.load` in the same `BatchEngine`, i.e. mlx_lm.server's batching)
without and with a prompt cache (mlx_lm's `LRUPromptCache`, what mlx_lm.server keeps), and
chronos at `--budget` without and with it. Reported per turn (median over repeats): prompt
tokens, tokens taken from the cache, time to first token, and for chronos the expert bytes read
before the first token. With --check, chronos's replies must equal stock's with the same cache
setting (greedy).

    python scripts/bench_turns.py --budget 0.25 --turns 4 --max-tokens 24 --repeats 2 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from results import save_json  # noqa: E402


def messages(tokenizer, turns: int, tokens_each: int) -> list:
    """`turns` new messages (token ids) from the bundled English and Python held-out prompts."""
    from chronos_mlx.workloads import read_prompts

    pool = read_prompts("en", split="heldout") + read_prompts("python", split="heldout")
    return [tokenizer.encode(pool[i % len(pool)], add_special_tokens=i == 0)[:tokens_each] for i in range(turns)]


def conversation(engine, new_messages: list, max_tokens: int, runtime=None) -> list:
    """Serve the turns in order; per turn: prompt tokens, cached tokens, seconds to the first
    token, expert bytes read until then, the reply."""
    from chronos_mlx.serve import SamplingParams

    ids, rows = [], []
    for message in new_messages:
        ids = ids + message
        read0 = runtime.cache_totals()["bytes_read"] if runtime is not None and runtime.cache is not None else 0
        t0 = time.perf_counter()
        handle = engine.submit(ids, SamplingParams(max_tokens=max_tokens))
        reply, first, read = [], None, 0
        for ev in handle.events():
            if ev.token is None:
                continue
            if first is None:
                first = time.perf_counter() - t0
                if runtime is not None and runtime.cache is not None:
                    read = runtime.cache_totals()["bytes_read"] - read0
            reply.append(ev.token)
        rows.append({"prompt_tokens": len(ids), "cached_tokens": handle.cached_tokens, "ttft_s": first,
                     "bytes_read_to_first_token": read, "reply": reply})
        ids = ids + reply
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path or repo (default: the embedded demo model)")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--tokens-each", type=int, default=96, help="tokens of each new message")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefill-step-size", type=int, default=256)
    ap.add_argument("--check", action="store_true", help="chronos's replies must equal stock's (greedy)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import chronos_mlx
    from chronos_mlx.serve import BatchEngine
    from mlx_lm import load

    path = args.model or str(chronos_mlx.DEFAULT_MODEL)
    dtype = mx.float32 if mx.default_device() == mx.cpu else None
    stock, tok = load(path)
    if dtype is not None:
        stock.set_dtype(dtype)
    model, _, runtime = chronos_mlx.load(path, args.budget, dtype="float32" if dtype is not None else None)
    turns = messages(tok, args.turns, args.tokens_each)
    configs = [("mlx_lm", stock, None, 0), ("mlx_lm+prompt-cache", stock, None, 10),
               (f"chronos@{args.budget}", model, runtime, 0), (f"chronos@{args.budget}+prompt-cache", model, runtime, 10)]
    runs = {name: [] for name, *_ in configs}
    for _ in range(args.repeats):
        for name, m, rt, size in configs:
            engine = BatchEngine(m, tok, rt, prefill_step_size=args.prefill_step_size, prompt_cache_size=size)
            with engine:
                runs[name].append(conversation(engine, turns, args.max_tokens, rt))
    table, same = {}, True
    for name, rows in runs.items():
        table[name] = [{
            "turn": t + 1,
            "prompt_tokens": rows[0][t]["prompt_tokens"],
            "cached_tokens": rows[0][t]["cached_tokens"],
            "ttft_s": statistics.median(r[t]["ttft_s"] for r in rows),
            "bytes_read_to_first_token": statistics.median(r[t]["bytes_read_to_first_token"] for r in rows),
        } for t in range(args.turns)]
    if args.check:
        for cache in ("", "+prompt-cache"):
            want = [t["reply"] for t in runs["mlx_lm" + cache][0]]
            got = [t["reply"] for t in runs[f"chronos@{args.budget}" + cache][0]]
            same &= got == want
    print(f"{'configuration':32s} " + " ".join(f"turn {t + 1:<14d}" for t in range(args.turns)))
    for name, rows in table.items():
        cells = [f"{r['ttft_s'] * 1e3:7.0f} ms ({r['cached_tokens']:>4d}/{r['prompt_tokens']:<4d})" for r in rows]
        print(f"{name:32s} " + " ".join(cells))
    base = table[f"chronos@{args.budget}"]
    cached = table[f"chronos@{args.budget}+prompt-cache"]
    print("chronos TTFT with the prompt cache / without: "
          + ", ".join(f"{c['ttft_s'] / b['ttft_s']:.2f}" for b, c in zip(base, cached))
          + (f"; replies equal stock's: {same}" if args.check else ""))
    save_json(args.json, {"model": path, "budget": args.budget, "device": str(mx.default_device()), "args": vars(args),
                          "turns": table, "replies_equal_stock": same if args.check else None}, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
