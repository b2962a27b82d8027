"""Where decode time goes under misses: host reads, load bookkeeping, copies (issue 12).

    python scripts/decode_cost_split.py [--model DIR] [--budget 0.5] [--rounds 5] [--cpu] [--json OUT]

Four configurations, interleaved round by round on the same replayed text (2 prompts):
- stock: mlx_lm with the whole model resident;
- reads-only: chronos with one slot fewer than experts per layer (budget (E-1)/E), per layer:
  every MoE layer is gated and its routing read back to the host, and almost nothing misses
  (the expert left out is a rarely used one; misses are printed);
- no-copies: chronos at --budget, per layer, with every expert read replaced by nothing (the
  slots keep stale bytes: its tokens are wrong, its time is the loads' bookkeeping only);
- budget: chronos at --budget, per layer, as shipped.
Reports each one's fastest and median round in ms/token. Differences: reads-only - stock is
what per-layer host reads cost; no-copies - reads-only the loads' bookkeeping; budget -
no-copies their reads and copies.
"""

from __future__ import annotations

import argparse
import statistics

import mlx.core as mx
from results import save_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--workload", default="en")
    ap.add_argument("--cpu", action="store_true", help="run MLX's CPU backend (also on a GPU host)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)

    from mlx_lm import load as stock_load

    import chronos_mlx
    from chronos_mlx import bench, loader
    from chronos_mlx.cache import ExpertCache

    prompts, forced = bench.replay_texts(args.workload, args.model, limit=2, max_prompt_tokens=16,
                                         max_tokens=args.max_tokens)
    stock, _ = stock_load(str(loader.resolve_model_path(args.model)))
    target = loader.compute_dtype(None)
    if target is not None:
        stock.set_dtype(target)
    mx.eval(stock.parameters())
    from chronos_mlx.loader import plan_model

    experts = plan_model(args.model, None).info["num_experts"]
    resident = chronos_mlx.load(args.model, expert_budget=(experts - 1) / experts)
    partial = chronos_mlx.load(args.model, expert_budget=args.budget)
    hollow = chronos_mlx.load(args.model, expert_budget=args.budget)
    real_read = ExpertCache._read_small

    def no_read(self, L, items, checked=False):
        return [0.0] * len(items)

    def run(kind):
        steps = seconds = 0.0
        for p, f in zip(prompts, forced):
            if kind == "stock":
                r = bench._stock_run(stock, p, args.max_tokens, f)
            else:
                model, _, rt = {"reads-only": resident, "no-copies": hollow, "budget": partial}[kind]
                ExpertCache._read_small = no_read if kind == "no-copies" else real_read
                try:
                    r = bench._chronos_run(model, rt, p, args.max_tokens, "per-layer", f)
                finally:
                    ExpertCache._read_small = real_read
            steps += r["decode_steps"]
            seconds += r["decode_s"]
            misses[kind] = misses.get(kind, 0) + r.get("decode_misses", 0)
        return seconds / steps * 1e3

    misses = {}

    kinds = ["stock", "reads-only", "no-copies", "budget"]
    for k in kinds:  # warm-up
        run(k)
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k in kinds:
            times[k].append(run(k))
    print(_table(times))
    tokens = (args.rounds + 1) * sum(len(f) for f in forced)
    print("decode misses per token: " + ", ".join(f"{k} {v / tokens:.2f}" for k, v in misses.items()))
    save_json(args.json, {"budget": args.budget, "rounds": args.rounds, "ms_per_token": times,
              "decode_misses": {k: v / tokens for k, v in misses.items()}}, indent=1)


def _table(times: dict) -> str:
    """Fastest and median round of each configuration, and the fastest against stock's."""
    rows = []
    for k, v in times.items():
        best = min(v)
        rows.append(f"{k:>10}: fastest {best:6.2f}  median {statistics.median(v):6.2f} ms/token   "
                    f"ratio to stock (fastest) {min(times['stock']) / best:.3f}")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
