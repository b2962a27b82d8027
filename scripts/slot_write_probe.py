"""How fast can the host put expert bytes where the device's kernels read them?

    python scripts/slot_write_probe.py [--slots 64] [--k 8] [--iters 30] [--cpu]

Qwen3-30B-A3B-sized 4-bit experts (2.65 MB each: three [768|2048, ...] uint32 weights and
their bf16 scales and biases). Each iteration makes `k` experts resident in random slots,
then runs the gather_qmm products that read them and waits. Ways of writing:

- inplace: numpy views of the slot arrays, written by the host (chronos's path today). On
  Apple silicon that is plain shared memory; on CUDA the slots are managed memory, and the
  pages the GPU just read migrate back and forth.
- functional: the bytes are copied into a fresh MLX array and scattered into the slots by
  the device (`slots[ids] = staged`): one host-to-device copy, the device does the rest.
- compute: the products only (no writes), to subtract.

Prints per-iteration time and the effective write rate, host bytes / (time - compute).
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import numpy as np

SHAPES = {  # per expert: (rows, uint32 columns) of the weight, group 64, 4-bit
    "gate": (768, 2048 // 8),
    "up": (768, 2048 // 8),
    "down": (2048, 768 // 8),
}


def make(slots: int):
    out = {}
    for name, (r, c) in SHAPES.items():
        groups = c * 8 // 64
        out[name] = [mx.zeros((slots, r, c), dtype=mx.uint32), mx.zeros((slots, r, groups), dtype=mx.bfloat16),
                     mx.zeros((slots, r, groups), dtype=mx.bfloat16)]
    mx.eval(out)
    return out


def host_experts(n: int, rng):
    """`n` experts' bytes in host memory (stands in for what pread put there)."""
    out = []
    for _ in range(n):
        e = {}
        for name, (r, c) in SHAPES.items():
            groups = c * 8 // 64
            e[name] = [rng.integers(0, 2**32, (r, c), dtype=np.uint32),
                       (rng.standard_normal((r, groups)).astype(np.float32) * 0.01).view(np.uint32) >> 16,
                       (rng.standard_normal((r, groups)).astype(np.float32) * 0.01).view(np.uint32) >> 16]
            e[name][1] = e[name][1].astype(np.uint16)
            e[name][2] = e[name][2].astype(np.uint16)
        out.append(e)
    return out


def _host_view(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: the same buffer as uint16
        a = mx.view(a, mx.uint16)
        mx.eval(a)
    return np.array(a, copy=False)


def products(p, x, idx):
    h = x
    g = mx.gather_qmm(h, *p["gate"], rhs_indices=idx, transpose=True, group_size=64, bits=4)
    u = mx.gather_qmm(h, *p["up"], rhs_indices=idx, transpose=True, group_size=64, bits=4)
    a = (g * mx.sigmoid(g)) * u
    return mx.gather_qmm(a, *p["down"], rhs_indices=idx, transpose=True, group_size=64, bits=4)


def run(method: str, slots: int, k: int, iters: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    p = make(slots)
    pool = host_experts(16, rng)
    x = mx.random.normal((k, 1, 1, 2048)).astype(mx.bfloat16)
    views = None
    if method == "inplace":
        views = {n: [_host_view(a) for a in arrs] for n, arrs in p.items()}
    times = []
    nbytes = 0
    for it in range(iters + 3):
        sl = rng.choice(slots, k, replace=False)
        src = [pool[int(i)] for i in rng.integers(0, len(pool), k)]
        t0 = time.perf_counter()
        if method == "inplace":
            for s, e in zip(sl.tolist(), src):
                for n in SHAPES:
                    for v, data in zip(views[n], e[n]):
                        v[s] = data
        elif method == "functional":
            ids = mx.array(sl.astype(np.uint32))
            for n in SHAPES:
                for j in range(3):
                    staged = mx.array(np.stack([e[n][j] for e in src]))
                    if j:
                        staged = mx.view(staged, mx.bfloat16)
                    p[n][j][ids] = staged
        idx = mx.array(sl.astype(np.uint32)).reshape(k, 1, 1)
        y = products(p, x, idx)
        mx.eval(y)
        if it >= 3:
            times.append(time.perf_counter() - t0)
            nbytes += 0 if method == "compute" else k * sum(a.nbytes for n in SHAPES for a in src[0][n])
    t = float(np.median(times))
    return {"method": method, "ms_per_iter": t * 1e3, "bytes_per_iter": nbytes / iters}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    rows = [run(m, args.slots, args.k, args.iters) for m in ("compute", "inplace", "functional", "compute", "inplace", "functional")]
    base = min(r["ms_per_iter"] for r in rows if r["method"] == "compute")
    for r in rows:
        extra = r["ms_per_iter"] - base
        r["write_GBps"] = r["bytes_per_iter"] / (extra / 1e3) / 1e9 if r["bytes_per_iter"] and extra > 0 else None
        print(f"{r['method']:>10}: {r['ms_per_iter']:8.3f} ms/iter"
              + (f"  {r['bytes_per_iter'] / 1e6:6.1f} MB  {r['write_GBps']:.2f} GB/s" if r["write_GBps"] else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(mx.default_device()), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
