"""How fast can one request's experts be read, and by which path? (No MLX: numpy and the OS.)

Reads k expert-sized ranges (default 2.65 MB, Qwen3-30B-A3B 4-bit) at random offsets of a file
in the page cache into one buffer, timing each call, by:
  preadv         the calling thread alone, one call a range (chronos's inline path)
  threads-N      Python threads, the ranges cut in N pieces (chronos's ShardReader split)
  lio-N          chronos_mlx.lio: POSIX lio_listio over N pieces in one call (Linux glibc: its
                 own threads, which serialise one descriptor's requests, so piece i goes through
                 dup'd descriptor i mod N)
with the interpreter idle, and with a second Python thread busy (as the decode loop's main
thread is while a device-wait request is served).
  python scripts/read_paths.py [--file PATH] [--mb 2.65] [--ks 1,2,4] [--ns 2,4,8] [--calls 200] [--json F]"""
import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _load_lio():
    # chronos_mlx/lio.py alone (it imports nothing of the package): no MLX needed here.
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("chronos_lio", Path(__file__).resolve().parents[1] / "chronos_mlx" / "lio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lio = _load_lio()


def pieces(ranges, n):
    """(offset, dest offset, nbytes) cut into about n pieces of similar size."""
    total = sum(r[2] for r in ranges)
    cut = max(64 << 10, -(-total // n))
    out = []
    for off, dst, nb in ranges:
        for s in range(0, nb, cut):
            out.append((off + s, dst + s, min(cut, nb - s)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", default="/tmp/read_paths.bin")
    ap.add_argument("--file-gb", type=float, default=2.0)
    ap.add_argument("--mb", type=float, default=2.65)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--ns", default="2,4,8")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    size = int(args.file_gb * 2**30)
    if not os.path.exists(args.file) or os.path.getsize(args.file) < size:
        with open(args.file, "wb") as f:
            chunk = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
            for _ in range(size // len(chunk)):
                f.write(chunk)
    fd = os.open(args.file, os.O_RDONLY)
    size = os.fstat(fd).st_size
    buf = np.empty(64 << 20, dtype=np.uint8)
    os.preadv(fd, [buf], 0)
    for off in range(0, size, len(buf)):  # into the page cache
        os.preadv(fd, [buf], off)
    nb = int(args.mb * 1e6)
    ns = [int(n) for n in args.ns.split(",")]
    fds = [os.dup(fd) for _ in range(max(ns))]
    pool = ThreadPoolExecutor(max(ns) - 1)
    rng = np.random.default_rng(1)

    def one(r):
        off, dst, n = r
        got = os.preadv(fd, [memoryview(buf)[dst : dst + n]], off)
        assert got == n

    def run_preadv(rs):
        for r in rs:
            one(r)

    def run_threads(rs, n):
        ps = pieces(rs, n)
        groups = [ps[i::n] for i in range(n)]
        futs = [pool.submit(run_preadv, g) for g in groups[1:]]
        run_preadv(groups[0])
        for f in futs:
            f.result()

    def run_lio(rs, n):
        ps = pieces(rs, n)
        view = memoryview(buf)
        got = lio.read_pieces([(fds[i % n], off, view[dst : dst + m]) for i, (off, dst, m) in enumerate(ps)])
        assert got == [m for _, _, m in ps]

    paths = [("preadv", run_preadv)] + [(f"threads-{n}", lambda rs, n=n: run_threads(rs, n)) for n in ns]
    if lio.available():
        paths += [(f"lio-{n}", lambda rs, n=n: run_lio(rs, n)) for n in ns]
    truth = np.empty(nb, dtype=np.uint8)
    results = []
    stop = threading.Event()

    def busy():  # a Python thread that never blocks: holds the interpreter lock between switches
        x = 0
        while not stop.is_set():
            x = (x * 31 + 7) % 1000003

    for contended in (False, True):
        if contended:
            stop.clear()
            spinner = threading.Thread(target=busy, daemon=True)
            spinner.start()
        for k in [int(k) for k in args.ks.split(",")]:
            for name, fn in paths:
                times = []
                for c in range(args.calls):
                    offs = rng.integers(0, (size - nb) // 4096, k) * 4096
                    rs = [(int(o), i * nb, nb) for i, o in enumerate(offs)]
                    t = time.perf_counter()
                    fn(rs)
                    times.append(time.perf_counter() - t)
                    if c == 0:  # the bytes are right
                        os.preadv(fd, [truth], rs[-1][0])
                        assert np.array_equal(buf[rs[-1][1] : rs[-1][1] + nb], truth), name
                med = statistics.median(times)
                row = {"path": name, "experts": k, "busy_thread": contended, "median_us": med * 1e6,
                       "p90_us": sorted(times)[int(0.9 * len(times))] * 1e6, "gb_per_s": k * nb / med / 1e9}
                results.append(row)
                print(f"{'busy' if contended else 'idle'}  k={k}  {name:>10}: median {row['median_us']:7.0f} us  "
                      f"p90 {row['p90_us']:7.0f} us  {row['gb_per_s']:5.1f} GB/s", flush=True)
        if contended:
            stop.set()
            spinner.join()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpus": os.cpu_count(), "platform": sys.platform}, "mb": args.mb,
                       "calls": args.calls, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
