"""What a demand load costs right after compute, against a tight loop (issue 12, CPU).

    python scripts/cold_reads.py [--model DIR] [--rounds 200] [--json OUT]

On MLX's CPU backend, times (median of --rounds) right after an MLX evaluation of one-token
work (40 matrix-vector products over a 4 MB matrix, like a decode step's layers), after a
64 MB sweep, and in a tight loop: a two-expert `ExpertCache._read_small` of the model at
budget 0.5, one 24 KB-class `pread` of an expert's tensor from the page cache, an 83 KB
numpy copy and 100 steps of a Python loop. The gap is what the caches cost a decode step's
loads, which always run right after compute.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import mlx.core as mx
import numpy as np
from results import save_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)

    import chronos_mlx

    _, _, runtime = chronos_mlx.load(args.model, expert_budget=0.5)
    cache = runtime.cache
    L = cache.layers[len(cache.layers) // 2]
    plan = L.read_plan or cache._make_read_plan(L)
    n_experts = L.num_experts
    big = plan[max(range(len(plan)), key=lambda i: plan[i].nbytes)]
    a, b = mx.random.normal((1, 512)), mx.random.normal((512, 2048))
    mx.eval(a, b)
    src = np.random.randint(0, 255, size=8 << 20, dtype=np.uint8)
    dst = np.zeros(cache.bytes_on_disk_per_expert, np.uint8)
    sweep = np.zeros(64 << 20, np.uint8)

    def compute():
        y = a
        for _ in range(40):
            y = (y @ b)[:, :512] * 0.01
        mx.eval(y)

    def flush():
        sweep[::64] += 1

    def read_two():
        items = [(e, s) for s, e in enumerate(random.sample(range(n_experts), 2))]
        t0 = time.perf_counter()
        cache._read_small(L, items, checked=True)
        return time.perf_counter() - t0

    def one_pread():
        e = random.randrange(n_experts)
        t0 = time.perf_counter()
        os.preadv(big.fds[e], [big.rows[0]], big.offsets[e])
        return time.perf_counter() - t0

    def copy():
        o = random.randrange(0, src.size - dst.size)
        t0 = time.perf_counter()
        dst[:] = src[o : o + dst.size]
        return time.perf_counter() - t0

    def python_loop():
        t0 = time.perf_counter()
        s = 0
        for i in range(100):
            s += i
        return time.perf_counter() - t0

    rows = {}
    for name, f in [("read 2 experts", read_two), (f"pread {big.nbytes // 1024} KB", one_pread),
                    (f"numpy copy {dst.size // 1024} KB", copy), ("python loop 100", python_loop)]:
        for when, before in [("tight", lambda: None), ("after compute", compute), ("after 64 MB sweep", flush)]:
            times = []
            for _ in range(args.rounds):
                before()
                times.append(f())
            us = float(np.median(times) * 1e6)
            rows.setdefault(name, {})[when] = us
            print(f"{name:20s} {when:18s} median {us:7.1f} us")
    save_json(args.json, {"rounds": args.rounds, "median_us": rows})


if __name__ == "__main__":
    main()
