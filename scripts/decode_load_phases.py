"""Where demand loads spend their time *inside* a decode (issue 12), not in a loop of loads.

    python scripts/decode_load_phases.py [--model DIR] [--budget 0.5] [--tokens 64] [--routing trained] [--json OUT]

Decodes --tokens greedy tokens with per-layer (gated) routing at --budget after a short warm-up,
timing the load path's functions where they are called (`Runtime.load_for`, `ExpertCache.ensure`
and its lean path, the reads, victim choice, the shard check, mapping). The wrappers add a few
microseconds a call; the point is the split, and the comparison with `load_path_micro.py`
(the same functions warm, with no model computing between calls).
"""

from __future__ import annotations

import argparse
import collections
import time

import mlx.core as mx
from results import save_json

PHASES = [("runtime", "load_for"), ("cache", "ensure"), ("cache", "_ensure_now"), ("cache", "_read_experts"),
          ("cache", "_read_small"), ("cache", "_take_slots"), ("cache", "_check_files"), ("cache", "_map"),
          ("cache", "_copy_to_device"), ("cache", "write_gate_table")]  # (the last two: CUDA's copies, the gate table)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", default="The history of the Roman Empire begins with the founding of the city")
    ap.add_argument("--routing", choices=["model", "trained"], default="model",
                    help="trained: replay a python text with trained-like routing (random-weight checkpoints)")
    ap.add_argument("--json")
    args = ap.parse_args()

    import chronos_mlx
    from chronos_mlx.generate import generate_step

    model, tok, rt = chronos_mlx.load(args.model, expert_budget=args.budget)
    prompt = mx.array(tok.encode(args.prompt))
    decoding = dict
    if args.routing == "trained":  # as bench_sync.py --routing trained (greedy would route one set)
        from chronos_mlx.bench_routing import replay_one_text

        ids, decoding = replay_one_text(model, args.model, rt.info, max_tokens=args.tokens)
        prompt = mx.array(ids)
    spent, calls = collections.defaultdict(float), collections.defaultdict(int)

    def timed(owner, name):
        f = getattr(owner, name)

        def call(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
                calls[name] += 1

        setattr(owner, name, call)

    for where, name in PHASES:
        timed(rt if where == "runtime" else rt.cache, name)
    list(generate_step(prompt, model, rt, max_tokens=8, sync="per-layer", **decoding()))
    # From the first token on (the prefill's loads are not the decode's): counters cleared there.
    t0 = bytes0 = None
    for i, _ in enumerate(generate_step(prompt, model, rt, max_tokens=args.tokens + 1, sync="per-layer", **decoding())):
        if i == 0:
            spent.clear()
            calls.clear()
            bytes0 = rt.cache_totals()["bytes_read"]
            t0 = time.perf_counter()
    per_token = (time.perf_counter() - t0) / args.tokens
    mb = (rt.cache_totals()["bytes_read"] - bytes0) / args.tokens / 1e6
    print(f"budget {args.budget}: {per_token * 1e3:.2f} ms/token, {mb:.2f} MB read/token")
    rows = []
    for _, name in PHASES:
        n = calls[name]
        row = {"phase": name, "ms_per_token": spent[name] / args.tokens * 1e3, "calls_per_token": n / args.tokens,
               "us_per_call": spent[name] / n * 1e6 if n else 0.0}
        rows.append(row)
        print(f"  {name:14s} {row['ms_per_token']:6.3f} ms/token  {row['calls_per_token']:5.1f} calls/token  "
              f"{row['us_per_call']:6.0f} us/call")
    if args.json:
        save_json(args.json, {"budget": args.budget, "tokens": args.tokens, "ms_per_token": per_token * 1e3,
                              "mb_read_per_token": mb, "phases": rows})


if __name__ == "__main__":
    main()
