"""The segment planner against a simulated machine: how fast it settles, what it costs (issue 12).

    python scripts/planner_sim.py [--layers 48] [--base-ms 20] [--read-ms 0.4] [--layer-ms 0.4]
                                  [--miss 0.002] [--steps 200] [--seeds 5] [--trace]

A step costs base + read x ends (+ noise); each MoE layer misses with probability --miss
(--early-miss for the first 10 steps, as right after a prefill); a miss inside a segment redoes
the layers from it to the segment's end (to the end of the step and the step behind it when no
end follows) at --layer-ms each, plus a recovery. The planner sees exactly what `generate.py`
gives it (`observe_misses`, `observe_step` with the previous step's ends). Prints the share of
per-layer steps and the mean step against the two extremes. Defaults: the H200 with the
Qwen3-30B-A3B geometry just below budget 1.0 (a gated layer ~0.4 ms, a token ~20 ms). Tunes the
planner without a device; the figures are the model's, not a machine's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chronos_mlx.verification import SegmentPlanner  # noqa: E402


def simulate(n, base, read, layer, miss, steps, seed, early_miss=None, recovery=0.002, prior=None, gate=None,
             early_steps=10, decay=0.1):
    rng = np.random.default_rng(seed)
    planner = SegmentPlanner(n, miss=np.full(n, miss if prior is None else prior), decay=decay)
    previous, sizes, total = None, [], 0.0
    for t in range(steps):
        ends = planner.ends()
        k = len(ends)
        p = early_miss if early_miss is not None and t < early_steps else miss
        missed = [l for l in range(n) if rng.random() < p]
        # Per-layer routing (every layer an end) takes the gated path: its own cost a layer.
        cost = base + (gate if k >= n and gate is not None else read) * k + rng.normal(0, 0.03 * base)
        redo = recoveries = 0
        bad = [l for l in missed if l not in ends] if k < n else []
        if bad:
            first = min(bad)
            later = [e for e in ends if e >= first]
            redo = (min(later) if later else n + n) - first  # no end after it: the step behind it too
            recoveries = 1
            cost += layer * redo + recovery
            planner.observe_misses([l for l in range(n) if l <= first], {first})
        else:
            planner.observe_misses(range(n), set(missed))
        planner.observe_step(cost, ends=k, recomputed_layers=redo, recoveries=recoveries, previous_ends=previous)
        previous = k
        sizes.append(k)
        total += cost
    return sizes, total / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--base-ms", type=float, default=20.0, help="a step with no segment end")
    ap.add_argument("--read-ms", type=float, default=0.4, help="what each segment end adds")
    ap.add_argument("--layer-ms", type=float, default=0.4, help="recomputing one layer")
    ap.add_argument("--miss", type=float, default=0.002, help="chance a layer misses in a step")
    ap.add_argument("--early-miss", type=float, default=None, help="chance a layer misses in the first steps")
    ap.add_argument("--early-steps", type=int, default=10)
    ap.add_argument("--gate-ms", type=float, default=None,
                    help="what each layer adds when every layer is an end (per-layer routing's gates; default --read-ms)")
    ap.add_argument("--prior", type=float, default=None, help="the planner's starting miss estimate (default --miss)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--decay", type=float, default=0.1, help="the planner's weight of the newest step in its miss estimates")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trace", action="store_true", help="print the number of ends of every step (first seed)")
    args = ap.parse_args()
    n, ms = args.layers, 1e-3
    runs = [simulate(n, args.base_ms * ms, args.read_ms * ms, args.layer_ms * ms, args.miss, args.steps, s,
                     args.early_miss, prior=args.prior, gate=None if args.gate_ms is None else args.gate_ms * ms,
                     early_steps=args.early_steps, decay=args.decay) for s in range(args.seeds)]
    if args.trace:
        print(" ".join(str(k) for k in runs[0][0]))
    share = np.mean([np.mean([k >= n for k in sizes]) for sizes, _ in runs])
    mean = np.mean([m for _, m in runs]) / ms
    print(f"per-layer steps {share:.2f}; mean step {mean:.1f} ms (per layer "
          f"{args.base_ms + (args.read_ms if args.gate_ms is None else args.gate_ms) * n:.1f}, "
          f"no end {args.base_ms:.1f} plus recomputations)")


if __name__ == "__main__":
    main()
