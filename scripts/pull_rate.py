"""How fast a CUDA device pulls expert bytes from page-locked host memory into MLX arrays.

    python scripts/pull_rate.py [--experts 1,2,4] [--blocks 64,132,264,528] [--threads 256,512]
                                [--unroll 1,4] [--repeats 30] [--json OUT]

Under device-wait routing (docs/device_wait.md) a miss is answered with a list of copies from
page-locked staging to the slots, which the device makes itself with `wait_kernels`'s copy kernel
(uncached 16-byte loads over PCIe) while the layer waits. This times that kernel alone, by grid
size and loads in flight a thread (`CHRONOS_PULL_GRID` sets them for a run), for 1..N experts of Qwen3-30B-A3B's 4-bit layout (nine tensors, 2.65 MB an expert), against
the same launch with nothing to copy; the bytes are checked after each configuration. CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from results import save_json  # noqa: E402

# One expert of Qwen3-30B-A3B at 4 bits, group 64: gate, up and down weights, scales, biases.
EXPERT_TENSORS = [786432, 49152, 49152] * 3


def pull_seconds(plan: mx.array, slots: mx.array, grid: tuple, repeats: int) -> float:
    """Median seconds of one copy-kernel launch over `plan`, evaluated alone."""
    from chronos_mlx.wait_kernels import pull_copies

    ts = []
    for i in range(repeats + 3):
        out = pull_copies(plan, slots, grid)
        t0 = time.perf_counter()
        mx.eval(out)
        if i >= 3:  # the first launches compile and fault the pages in
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", default="1,2,4")
    ap.add_argument("--blocks", default="64,132,264,528")
    ap.add_argument("--threads", default="256,512")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--unroll", default="1,4", help="loads in flight a thread")
    ap.add_argument("--json")
    args = ap.parse_args()
    from chronos_mlx import wait_kernels
    from chronos_mlx.cache import _numpy_view

    if not wait_kernels.available():
        sys.exit("pull_rate.py needs MLX's CUDA backend")
    alloc = wait_kernels.pinned_alloc(wait_kernels.driver())
    slots = mx.zeros((1,), dtype=mx.uint32)
    rows = []
    for k in [int(x) for x in args.experts.split(",")]:
        sizes = EXPERT_TENSORS * k
        total = sum(sizes)
        staging = alloc(total)
        staging[:] = np.random.default_rng(k).integers(0, 256, total, dtype=np.uint8)
        dest = mx.zeros((total // 4,), dtype=mx.uint32)
        mx.eval(dest)
        view = _numpy_view(dest).view(np.uint8)
        copies, off = [], 0
        for n in sizes:
            copies += [staging.ctypes.data + off, view.ctypes.data + off, n]
            off += n
        plan = mx.array(np.array([len(sizes)] + copies, dtype=np.uint64))
        empty = mx.array(np.zeros(1 + 3 * len(sizes), dtype=np.uint64))
        for unroll in [int(x) for x in args.unroll.split(",")]:
            for threads in [int(x) for x in args.threads.split(",")]:
                for blocks in [int(x) for x in args.blocks.split(",")]:
                    view[:] = 0  # so the check below sees this configuration's copies
                    grid = (blocks, threads, unroll)
                    base = pull_seconds(empty, slots, grid, args.repeats)
                    t = pull_seconds(plan, slots, grid, args.repeats)
                    mx.eval(dest)
                    right = bool(np.array_equal(np.array(dest).view(np.uint8), staging))
                    rate = total / max(t - base, 1e-9)
                    rows.append({"unroll": unroll, "experts": k, "bytes": total, "blocks": blocks, "threads": threads,
                                 "launch_us": base * 1e6, "pull_us": t * 1e6, "gb_per_s": rate / 1e9, "bytes_right": right})
                    print(f"unroll {unroll} {k} expert(s) {total / 1e6:5.2f} MB  {blocks:4d} x {threads}: {t * 1e6:7.1f} us "
                          f"(empty launch {base * 1e6:5.1f} us) -> {rate / 1e9:5.1f} GB/s  bytes right: {right}", flush=True)
    save_json(args.json, {"device": str(mx.default_device()), "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
