"""Picture a segment planner trace (issue 12): what it planned and what each step cost.

    python scripts/plot_planner_trace.py TRACE.json OUT.png [--title TEXT]

TRACE.json is what `python scripts/bench_sync.py ... --planner-trace TRACE.json` writes. One
panel per planner (a benchmark configuration; the runtime's planner carries over from its
untimed first pass to the measured ones): per step, the segment ends chosen and the fewest
the cost model planned (every layer an end is per-layer routing), the step's seconds (loads
left out), and the mean of the per-layer miss estimates. Needs matplotlib (the `plot` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def split_by_planner(events: list) -> list[list]:
    """The events of each planner, in the order planners first appear."""
    order, out = [], {}
    for e in events:
        if e[1] not in out:
            order.append(e[1])
            out[e[1]] = []
        out[e[1]].append(e)
    return [out[k] for k in order]


def series(events: list) -> dict:
    """Per decision: ends chosen, ends planned, mean miss estimate; per step: ms, recomputed."""
    chosen, planned, miss, step_ms, redo = [], [], [], [], []
    for e in events:
        if e[0] == "ends":
            chosen.append(e[2])
            planned.append(e[3])
            miss.append(e[7])
        else:
            step_ms.append(e[2] * 1e3)
            redo.append(e[4])
    return dict(chosen=chosen, planned=planned, miss=miss, step_ms=step_ms, redo=redo)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("out")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("matplotlib is needed: pip install -e '.[plot]'")
    planners = [series(p) for p in split_by_planner(json.loads(Path(args.trace).read_text()))]
    if not planners:
        sys.exit(f"{args.trace}: no planner events")
    fig, axes = plt.subplots(len(planners), 1, figsize=(10, 3.2 * len(planners)), squeeze=False)
    for i, (ax, s) in enumerate(zip(axes[:, 0], planners)):
        ax.step(range(len(s["chosen"])), s["chosen"], where="post", label="ends chosen", color="tab:blue")
        ax.step(range(len(s["planned"])), s["planned"], where="post", label="ends planned", color="tab:cyan",
                linestyle="--")
        ax.set_ylabel("segment ends")
        ax.set_xlabel("decision (one per decode step)")
        right = ax.twinx()
        right.plot(range(len(s["step_ms"])), s["step_ms"], ".", color="tab:red", label="step ms (loads left out)")
        right.set_ylabel("step ms")
        ax.set_title(f"planner {i + 1}: mean miss estimate {s['miss'][0]:.3f} -> {s['miss'][-1]:.3f}" if s["miss"]
                     else f"planner {i + 1}")
        lines = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
