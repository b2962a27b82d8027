"""How fast can one request's experts be read, and by which path? (No MLX: numpy and the OS.)

Reads k expert-sized ranges (default 2.65 MB, Qwen3-30B-A3B 4-bit) at random offsets of a file
in the page cache into one buffer, timing each call, by:
  preadv         the calling thread alone, one call a range (chronos's inline path)
  threads-N      Python threads, the ranges cut in N pieces (chronos's ShardReader split)
  lio-N          POSIX lio_listio(LIO_WAIT) over N pieces in one call (Linux glibc: its own
                 threads, which serialise the requests of one descriptor, so each piece goes
                 through one of N dup'd descriptors)
with the interpreter idle, and with a second Python thread busy (as the decode loop's main
thread is while a device-wait request is served).
  python scripts/read_paths.py [--file PATH] [--mb 2.65] [--ks 1,2,4] [--ns 2,4,8] [--calls 200] [--json F]"""
import argparse
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class _Sigevent(ctypes.Structure):  # x86-64 / aarch64 glibc: 64 bytes
    _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int), ("notify", ctypes.c_int), ("pad", ctypes.c_byte * 48)]


class _Aiocb(ctypes.Structure):  # glibc's struct aiocb (64-bit)
    _fields_ = [("fildes", ctypes.c_int), ("lio_opcode", ctypes.c_int), ("reqprio", ctypes.c_int),
                ("buf", ctypes.c_void_p), ("nbytes", ctypes.c_size_t), ("sigevent", _Sigevent),
                ("next_prio", ctypes.c_void_p), ("abs_prio", ctypes.c_int), ("policy", ctypes.c_int),
                ("error_code", ctypes.c_int), ("return_value", ctypes.c_ssize_t), ("offset", ctypes.c_int64),
                ("reserved", ctypes.c_char * 32)]


def _lio():
    if not sys.platform.startswith("linux"):
        return None
    for name in ("libc.so.6", "librt.so.1"):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            fn = lib.lio_listio
            fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.POINTER(_Aiocb)), ctypes.c_int, ctypes.c_void_p]
            return fn
        except (OSError, AttributeError):
            continue
    return None


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
    base = buf.ctypes.data
    lio = _lio()
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
        cbs = (_Aiocb * len(ps))()
        ptrs = (ctypes.POINTER(_Aiocb) * len(ps))()
        for i, (off, dst, m) in enumerate(ps):
            cb = cbs[i]
            cb.fildes, cb.lio_opcode, cb.buf, cb.nbytes, cb.offset = fds[i % n], 0, base + dst, m, off
            cb.sigevent.notify = 1  # SIGEV_NONE
            ptrs[i] = ctypes.pointer(cb)
        if lio(0, ptrs, len(ps), None) != 0:  # LIO_WAIT
            raise OSError(ctypes.get_errno(), "lio_listio")
        for i, (_, _, m) in enumerate(ps):
            if cbs[i].return_value != m:
                raise OSError(f"lio_listio: piece {i} read {cbs[i].return_value} of {m}")

    paths = [("preadv", run_preadv)] + [(f"threads-{n}", lambda rs, n=n: run_threads(rs, n)) for n in ns]
    if lio is not None:
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
