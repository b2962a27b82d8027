"""Peak resident memory of stock mlx_lm and chronos at several budgets, one process each.

    python scripts/peak_rss.py [--model DIR] [--budgets 1.0,0.5,0.25] [--max-tokens 64]

A process's peak RSS only grows, so each configuration runs in a fresh interpreter; each
generates the same greedy tokens from the same prompt (and says whether they match stock).
"""

import argparse
import json
import subprocess
import sys

PROBE = r"""
import json, resource, sys, time
import mlx.core as mx
from chronos_mlx.loader import resolve_model_path, compute_dtype
path, budget, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompt = mx.array(list(range(100, 164)))
if budget == "stock":
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    model, _ = load(str(resolve_model_path(path if path != "-" else None)))
    if compute_dtype() is not None:
        model.set_dtype(compute_dtype())
    ids = [int(t) for t, _ in generate_step(prompt, model, max_tokens=n)]
else:
    import chronos_mlx
    from chronos_mlx.generate import generate_step
    model, _, runtime = chronos_mlx.load(path if path != "-" else None, expert_budget=budget)
    ids = [t for t, _ in generate_step(prompt, model, runtime, max_tokens=n)]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"peak_rss_bytes": peak, "ids": ids}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="-")
    ap.add_argument("--budgets", default="1.0,0.5,0.25")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    rows = []
    ref = None
    for budget in ["stock", *args.budgets.split(",")]:
        out = subprocess.run([sys.executable, "-c", PROBE, args.model, budget, str(args.max_tokens)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ref = ref or r["ids"]
        rows.append({"config": "mlx_lm" if budget == "stock" else f"chronos@{budget}",
                     "peak_rss_mb": round(r["peak_rss_bytes"] / 1e6, 1), "same_tokens_as_stock": r["ids"] == ref})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
