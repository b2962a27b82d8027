"""What one demand load costs on the host, apart from decoding (issue 12).

    python scripts/load_path_micro.py [--budget 0.5] [--calls 4000] [--json OUT]

Two loops on the demo model (or --model), no model evaluation in between (so caches are
warmer than in a decode step, where the same work costs 2-3x more):
- `_read_small` alone, batches of k = 1, 2, 4, 8 experts into fixed slots: the reads,
  conversions and per-expert Python work of the lean demand path;
- the whole demand path a gate takes (`Runtime.load_for` + `mark_used` + the gate table),
  8 random experts per call, layer after layer, evicting as it goes.
Prints microseconds per call and per expert loaded.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from results import save_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--json")
    args = ap.parse_args()

    import chronos_mlx

    _, _, rt = chronos_mlx.load(args.model, expert_budget=args.budget)
    cache = rt.cache
    L = cache.layers[len(cache.layers) // 2]
    E, S = L.num_experts, L.num_slots
    rng = np.random.default_rng(0)
    out = {"budget": args.budget, "bytes_per_expert_on_disk": cache.bytes_on_disk_per_expert, "read_small": {}}
    for k in (1, 2, 4, 8):
        batches = [list(zip(rng.choice(E, k, replace=False).tolist(), rng.choice(S, k, replace=False).tolist()))
                   for _ in range(300)]
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for items in batches:
                cache._read_small(L, items)
            best = min(best, (time.perf_counter() - t) / len(batches))
        out["read_small"][k] = {"us_per_call": best * 1e6, "us_per_expert": best / k * 1e6}
        print(f"_read_small k={k}: {best * 1e6:7.1f} us/call  {best / k * 1e6:6.1f} us/expert", flush=True)
    # Reads touched slots behind the cache's back: start the demand loop from a clean state.
    _, _, rt = chronos_mlx.load(args.model, expert_budget=args.budget)
    cache = rt.cache
    n_layers = len(cache.layers)
    wanted = [rng.choice(E, 8, replace=False) for _ in range(args.calls)]

    def demand(n):
        loaded = 0
        t = time.perf_counter()
        for i in range(n):
            layer = i % n_layers
            loaded += len(rt.load_for(layer, sorted(set(wanted[i].tolist()))))
            cache.mark_used(layer, set(wanted[i].tolist()))
            cache.write_gate_table(layer)
        return time.perf_counter() - t, loaded

    demand(min(500, args.calls))
    dt, loaded = demand(args.calls)
    out["demand"] = {"us_per_call": dt / args.calls * 1e6, "us_per_expert": dt / max(loaded, 1) * 1e6,
                     "experts_per_call": loaded / args.calls}
    print(f"demand path: {out['demand']['us_per_call']:7.1f} us/call  {out['demand']['us_per_expert']:6.1f} us/expert"
          f"  ({out['demand']['experts_per_call']:.2f} experts loaded per call)")
    save_json(args.json, out, indent=1)


if __name__ == "__main__":
    main()
