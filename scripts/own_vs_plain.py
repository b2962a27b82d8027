"""chronos's own decode loop against the plain mlx_lm loop on the same chronos model, paired.

    python scripts/own_vs_plain.py [--model DIR] [--budgets 1.0,0.5,0.25] [--max-tokens 32]
                                   [--rounds 10] [--json OUT]

Greedy decoding of the demo prompt. Per budget, one chronos model is loaded and driven
alternately by `chronos_mlx.generate.generate_step` (own loop) and `mlx_lm.generate_step`
(plain loop), with stock mlx_lm (whole model resident) in between, `--rounds` times; each
round's decode tok/s is divided by the stock run of the same round, and the medians are
printed. Pairing within a round cancels most of a noisy machine's drift, which separate
runs do not. The tokens of all three must be identical (checked every round).
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


def drive(steps):
    """Drive a (token, logprobs) generator; returns (tokens, decode tok/s after the first token)."""
    tokens, t_first = [], None
    for tok, _ in steps:
        tokens.append(int(tok))
        if t_first is None:
            t_first = time.perf_counter()
    return tokens, (len(tokens) - 1) / (time.perf_counter() - t_first)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--budgets", default="1.0,0.5,0.25")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()

    from mlx_lm import load as stock_load
    from mlx_lm.generate import generate_step as plain_step
    from mlx_lm.utils import load_tokenizer

    import chronos_mlx
    from chronos_mlx.generate import generate_step as own_step
    from chronos_mlx.loader import resolve_model_path

    path = resolve_model_path(args.model)
    prompt = mx.array(load_tokenizer(path).encode("The history of the Roman Empire begins"))
    n = args.max_tokens
    stock, _ = stock_load(str(path))
    stock.set_dtype(mx.float32)
    mx.eval(stock.parameters())
    out = {"model": str(path), "max_tokens": n, "rounds": args.rounds, "budgets": {}}
    for b in [float(x) for x in args.budgets.split(",")]:
        model, _, rt = chronos_mlx.load(args.model, expert_budget=b)
        runs = {
            "stock": lambda: plain_step(prompt, stock, max_tokens=n),
            "own": lambda: own_step(prompt, model, rt, max_tokens=n),
            "plain": lambda: plain_step(prompt, model, max_tokens=n),
        }
        for fn in runs.values():  # warm-up: kernels, page cache, the planner's first estimates
            drive(fn())
        ratios = {"own": [], "plain": []}
        stock_tps = []
        identical = True
        for _ in range(args.rounds):
            got = {name: drive(fn()) for name, fn in runs.items()}
            identical &= got["own"][0] == got["stock"][0] == got["plain"][0]
            stock_tps.append(got["stock"][1])
            for name in ratios:
                ratios[name].append(got[name][1] / got["stock"][1])
        row = {
            "stock_tokens_per_s": statistics.median(stock_tps),
            "own_ratio": statistics.median(ratios["own"]),
            "plain_ratio": statistics.median(ratios["plain"]),
            "own_ahead_in_rounds": sum(o > p for o, p in zip(ratios["own"], ratios["plain"])),
            "tokens_identical": identical,
            "own_ratios": ratios["own"],
            "plain_ratios": ratios["plain"],
        }
        out["budgets"][str(b)] = row
        print(f"budget {b}: stock {row['stock_tokens_per_s']:.1f} tok/s; own loop {row['own_ratio']:.3f}x, "
              f"plain loop {row['plain_ratio']:.3f}x (own ahead in {row['own_ahead_in_rounds']}/{args.rounds} "
              f"rounds; per round own {min(ratios['own']):.2f}-{max(ratios['own']):.2f}, plain "
              f"{min(ratios['plain']):.2f}-{max(ratios['plain']):.2f}); tokens identical: {identical}", flush=True)
    save_json(args.json, out, indent=2)


if __name__ == "__main__":
    main()
