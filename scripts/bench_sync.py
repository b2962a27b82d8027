"""Decode speed of chronos vs stock mlx_lm, side by side in one process (issues 2 and 7).

    python scripts/bench_sync.py [--model DIR] [--budgets 1,0.5,0.25] [--max-tokens 64]
                                 [--repeats 3] [--prompts N] [--io-sim SPEC] [--json OUT]

Configurations: stock mlx_lm (resident), then for each budget chronos in each --modes
variant: a routing mode, optionally with a predictor after a colon (per-layer:gate,
per-layer:lookahead, optimistic). Prints a markdown table; --json writes everything.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chronos_mlx.bench import RESIDENT, BenchConfig, measure, measure_interleaved, report  # noqa: E402
from chronos_mlx.workloads import load_prompts  # noqa: E402


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
    ap.add_argument("--modes", default="per-layer,optimistic")
    ap.add_argument("--interleave", action="store_true", help="load all, measure round-robin (noisy machines)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    prompts = load_prompts(args.workload, args.model, limit=args.prompts, max_prompt_tokens=128)
    configs = [BenchConfig(RESIDENT, kind=RESIDENT)]
    for b in args.budgets.split(","):
        for variant in args.modes.split(","):
            mode, _, predictor = variant.partition(":")
            opts = {"io_sim": args.io_sim} if args.io_sim else {}
            if predictor:
                opts["predictor"] = predictor
            configs.append(BenchConfig(f"chronos-{variant}@{b}", budget=b, sync=mode, options=opts))
    rows = []
    if args.interleave:
        rows = measure_interleaved(configs, args.model, prompts, max_tokens=args.max_tokens,
                                   repeats=args.repeats, dtype=args.dtype)
    else:
        for cfg in configs:
            rows.append(measure(cfg, args.model, prompts, max_tokens=args.max_tokens, repeats=args.repeats, dtype=args.dtype))
            print(f"  measured {cfg.name}: {rows[-1]['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        # The ceiling again at the end: drift between first and last shows the noise floor.
        rows.append(measure(BenchConfig(RESIDENT + "-again", kind=RESIDENT), args.model, prompts,
                            max_tokens=args.max_tokens, repeats=args.repeats, dtype=args.dtype))
    out = report(rows, command=" ".join(sys.argv), io_sim=args.io_sim, max_tokens=args.max_tokens)
    cols = ["name", "decode_tokens_per_s", "ratio_to_resident", "host_syncs_per_token", "recompute_rate",
            "decode_hit_rate", "stall_s_per_token", "decode_bytes_read_per_token", "decode_misses_per_token",
            "prefetch_hits_per_token",
            "prediction_recall", "mlx_peak_memory_bytes"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in out["results"]:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
