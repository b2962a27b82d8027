"""What device-fetch's kernels cost on the GPU (CUDA), a decode step's worth of layers at a time.

A step of `--layers` MoE layers, each calling `fetch_kernels.fetch_experts` with `--top-k` ids
of which `--misses` are absent, chained as the decode chains them (each call takes the one
before it as `after`). The shards are page-locked host memory (as device-fetch registers them)
and each absent expert is `--expert-mb` copied as `--tensors` tensors into device slots. Before
each step the layers' tables are reset (slots 0..S-1 hold experts 0..S-1), so every step misses
the same. Per step: the host's time to build the calls, and `mx.eval`'s time (encoding and the
GPU's run; the GPU runs nothing before it). Variants: `plan` (the plan kernel alone, no copies),
`fetch` (plan and copies), and with `--free` the missing experts find free slots (no victim
search), which tells the search's cost from the copies'.

    python3 scripts/fetch_kernel_cost.py --misses 0,1,2,4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from chronos_mlx import fetch_kernels, wait_kernels  # noqa: E402
from chronos_mlx.cache import _numpy_view  # noqa: E402
from chronos_mlx.fetch_kernels import Journal, fetch_experts  # noqa: E402
from chronos_mlx.wait_kernels import ABSENT  # noqa: E402


def _layers(args, lib, source, per: int) -> list:
    E, S, T = args.experts, args.slots, args.tensors
    journal = Journal(args.layers, max(64, 4 * args.top_k), lib)
    states = []
    for layer in range(args.layers):
        slots = [mx.zeros((S, per), dtype=mx.uint8) for _ in range(T)]
        mx.eval(slots)
        src = np.array([[source[e, t].ctypes.data for t in range(T)] for e in range(E)], dtype=np.uint64).reshape(-1)
        state = {"table": mx.full((E,), ABSENT, dtype=mx.uint32), "owner": mx.full((S,), ABSENT, dtype=mx.uint32),
                 "score": mx.zeros((E,), dtype=mx.float32), "stamp": mx.zeros((E,), dtype=mx.uint32),
                 "src": mx.array(src), "dst": mx.array(np.array([_numpy_view(s).ctypes.data for s in slots], dtype=np.uint64)),
                 "nbytes": mx.array(np.full(T, per, dtype=np.uint64)), "journal": journal.address(layer)}
        mx.eval(list(state.values()))
        state["journal_width"] = journal.width
        state["views"] = {k: _numpy_view(state[k]) for k in ("table", "owner", "score", "stamp")}
        state["keep"] = slots
        states.append(state)
    return states, journal


def _reset(states, S: int, free: int):
    """Slots 0..free-1 empty, slots free..S-1 hold experts free..S-1, uses spread so the search
    must look at every slot."""
    for st in states:
        v = st["views"]
        v["table"][:] = ABSENT
        v["table"][free:S] = np.arange(free, S, dtype=np.uint32)
        v["owner"][:] = ABSENT
        v["owner"][free:S] = np.arange(free, S, dtype=np.uint32)
        v["score"][:] = np.linspace(1.0, 2.0, v["score"].size, dtype=np.float32)
        v["stamp"][:] = 1


def _plan_only(ids, state, tag, after):
    """The plan kernel's call as `fetch_experts` makes it, without the copy kernel."""
    template, plan_shape, _ = fetch_kernels._launch(state, ids.size, 32, False)
    inputs = [ids, state["table"], state["owner"], state["score"], state["stamp"], state["src"], state["dst"],
              state["nbytes"], state["journal"], tag, tag if after is None else after]
    threads = fetch_kernels.THREADS
    slots, _ = fetch_kernels._get_kernel()(inputs=inputs, template=template, grid=(threads, 1, 1), threadgroup=(threads, 1, 1),
                                          output_shapes=[ids.shape, plan_shape], output_dtypes=[mx.uint32, mx.uint64])
    return slots


def measure(states, args, misses: int, variant: str, free: bool) -> dict:
    S, k = args.slots, args.top_k
    start = misses if free else 0  # resident experts: start..S-1
    ids = mx.array(np.r_[np.arange(start, start + k - misses), S + np.arange(misses)].astype(np.uint32))
    mx.eval(ids)
    build, run = [], []
    for step in range(args.warmup + args.steps):
        _reset(states, S, misses if free else 0)
        tag = mx.array([2 + step], dtype=mx.uint32)
        t0 = time.perf_counter()
        after = None
        for st in states:
            after = (fetch_experts(ids, st, tag, after=after, half_life=32, lru=False) if variant == "fetch"
                     else _plan_only(ids, st, tag, after))
        t1 = time.perf_counter()
        mx.eval(after)
        t2 = time.perf_counter()
        if step >= args.warmup:
            build.append(t1 - t0)
            run.append(t2 - t1)
    copied = misses * args.layers * args.expert_mb * 2**20 if variant == "fetch" else 0
    ms = 1000 * statistics.median(run)
    return {"variant": variant, "misses_per_layer": misses, "free_slots": free, "build_ms": 1000 * statistics.median(build),
            "eval_ms": ms, "eval_ms_min": 1000 * min(run), "copied_mb": copied / 2**20,
            "copy_gb_per_s": copied / (ms / 1000) / 1e9 if copied else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tensors", type=int, default=9)
    ap.add_argument("--expert-mb", type=float, default=2.65)
    ap.add_argument("--misses", default="0,1,2,4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not wait_kernels.available():
        ap.error("needs MLX's CUDA backend")
    lib = wait_kernels.driver()
    per = int(args.expert_mb * 2**20) // args.tensors // 256 * 256
    args.expert_mb = per * args.tensors / 2**20
    source = wait_kernels.pinned_alloc(lib)(args.experts * args.tensors * per).reshape(args.experts, args.tensors, per)
    states, journal = _layers(args, lib, source, per)
    rows = []
    for misses in [int(m) for m in args.misses.split(",")]:
        for variant in ("plan", "fetch"):
            for free in ((False, True) if misses else (False,)):
                row = measure(states, args, misses, variant, free)
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    journal.close()


if __name__ == "__main__":
    main()
