"""Where a cold demand read's time goes on MLX's CPU backend: per system call, not per byte.

    python scripts/cold_syscalls.py

Medians of 300: a 64-byte and an expert-tensor-sized `preadv` from the page cache, and
`getppid`, in a tight loop and right after an MLX evaluation of one-token work (as
scripts/cold_reads.py). Session 18 on the 2-core box, two runs: 64 B 0.5 -> 5.5-10.3 us, 24 KB
1.2 -> 10.9-12.6 us, getppid 0.1 -> 1.6-1.7 us: a pread right after compute costs 5-10 us before
its bytes count, and a miss reads nine tensors.
"""

import os
import random
import time

import mlx.core as mx
import numpy as np

mx.set_default_device(mx.cpu)
import chronos_mlx  # noqa: E402
_, _, rt = chronos_mlx.load(None, expert_budget=0.5)
L = rt.cache.layers[4]
plan = L.read_plan or rt.cache._make_read_plan(L)
big = max(plan, key=lambda t: t.nbytes)
a, b = mx.random.normal((1, 512)), mx.random.normal((512, 2048)); mx.eval(a, b)
def compute():
    y = a
    for _ in range(40): y = (y @ b)[:, :512] * 0.01
    mx.eval(y)
buf64 = bytearray(64); bufbig = np.zeros(big.nbytes, np.uint8)
def pr(n):
    e = random.randrange(L.num_experts)
    t0 = time.perf_counter(); os.preadv(big.fds[e], [buf64 if n == 64 else bufbig], big.offsets[e]); return time.perf_counter() - t0
def getpid():
    t0 = time.perf_counter(); os.getppid(); return time.perf_counter() - t0
for name, f in [("pread 64 B", lambda: pr(64)), (f"pread {big.nbytes//1024} KB", lambda: pr(0)), ("getppid", getpid)]:
    for when, before in [("tight", lambda: None), ("after compute", compute)]:
        ts = []
        for _ in range(300):
            before(); ts.append(f())
        print(f"{name:14s} {when:14s} median {np.median(ts)*1e6:6.1f} us")
