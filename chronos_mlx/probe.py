"""Bandwidth probe: how fast this machine reads expert-sized ranges of a model's shards
into memory that MLX computes from.

Each read is one `os.preadv` of `chunk_bytes` (one expert's bytes on disk) at a random
offset of a shard, straight into a slot of a preallocated MLX array through its writable
numpy view (`np.array(arr, copy=False)`: MLX arrays expose their buffer, so the kernels
would read what was written there). The same reads are timed with 1, 2, 4, ... and N
threads (N = cores); the best rate is the load rate an expert cache could reach on this
machine, and the benchmark's I/O roofline is built from it.

The ranges are read once before timing, so every thread count sees the same page-cache
state (a warm page cache, like the benchmark's runs; the shards are read, never written).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

DEFAULT_TOTAL_BYTES = 256 * 1024**2


def thread_counts(cores: int | None = None) -> list[int]:
    """1, 2, 4, ... up to the core count, and the core count itself."""
    n = max(1, cores or os.cpu_count() or 1)
    counts, t = [], 1
    while t < n:
        counts.append(t)
        t *= 2
    counts.append(n)
    return counts


def shard_files(model_path) -> list[Path]:
    path = Path(model_path)
    files = sorted(p for p in path.glob("*.safetensors") if p.stat().st_size > 0)
    if not files:
        raise FileNotFoundError(f"{path}: no safetensors shards to probe")
    return files


def _slot_memory(slots: int, chunk: int):
    """A preallocated MLX array of `slots` rows of `chunk` bytes and a writable view of it."""
    arr = mx.zeros((slots, chunk), dtype=mx.uint8)
    mx.eval(arr)
    try:
        view = np.array(arr, copy=False)
        if not view.flags.writeable:
            raise ValueError("read-only view")
        return arr, view, "mlx"
    except (ValueError, TypeError, RuntimeError):  # a backend without host-visible buffers
        return arr, np.zeros((slots, chunk), dtype=np.uint8), "numpy"


def probe_read_bandwidth(model_path, chunk_bytes: int, *, threads=None, total_bytes: int = DEFAULT_TOTAL_BYTES,
                         seed: int = 0, repeats: int = 2) -> dict:
    """Read rate (bytes/s) of `chunk_bytes` reads from the shards at each thread count.

    total_bytes: how much one timed pass reads (capped by the shards' size). The best of
    `repeats` passes is kept per thread count. Returns a JSON-ready dict:
    rates_bytes_per_s {threads: rate}, best_bytes_per_s, best_threads, chunk_bytes, reads, into.
    """
    chunk = int(chunk_bytes)
    if chunk <= 0:
        raise ValueError("chunk_bytes must be positive")
    files = [f for f in shard_files(model_path) if f.stat().st_size >= chunk]
    if not files:
        raise ValueError(f"{model_path}: no shard holds {chunk} bytes")
    sizes = [f.stat().st_size for f in files]
    n_reads = max(1, min(int(total_bytes) // chunk, sum(sizes) // chunk))
    rng = np.random.default_rng(seed)
    weights = np.array(sizes, dtype=np.float64) / sum(sizes)
    which = rng.choice(len(files), size=n_reads, p=weights)
    offsets = [int(rng.integers(0, sizes[f] - chunk + 1)) // 4096 * 4096 for f in which]
    counts = sorted(set(int(t) for t in (threads or thread_counts())))
    slots = min(n_reads, max(counts) * 4)
    arr, view, into = _slot_memory(slots, chunk)
    fds = [os.open(f, os.O_RDONLY) for f in files]
    reads = [(fds[f], o) for f, o in zip(which.tolist(), offsets)]

    def work(items, first_slot, step):
        slot = first_slot
        for fd, off in items:
            buf = view[slot % slots]
            got = os.preadv(fd, [buf], off)
            if got < chunk:  # short read at a file's end: the rest of the range
                os.preadv(fd, [buf[got:]], off + got)
            slot += step

    def timed(n):
        parts = [reads[i::n] for i in range(n)]
        workers = [threading.Thread(target=work, args=(parts[i], i, n)) for i in range(n)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    rates = {}
    try:
        timed(max(counts))  # warm: every count then sees the same page-cache state
        for n in counts:
            best = min(timed(n) for _ in range(max(1, repeats)))
            rates[n] = n_reads * chunk / best if best > 0 else float("inf")
    finally:
        for fd in fds:
            os.close(fd)
    mx.eval(arr)
    best_threads = max(rates, key=rates.get)
    return {
        "chunk_bytes": chunk,
        "reads": n_reads,
        "bytes_per_pass": n_reads * chunk,
        "into": into,  # "mlx": an MLX array's own memory
        "files": len(files),
        "rates_bytes_per_s": {str(n): r for n, r in rates.items()},
        "best_bytes_per_s": rates[best_threads],
        "best_threads": best_threads,
        "cores": os.cpu_count(),
    }


def probe_model(model=None, dtype=None, **kw) -> dict:
    """The probe for a model (path, name or None for the demo), reads sized like its experts."""
    from .loader import plan_model

    info = plan_model(model, dtype).info
    chunk = info.get("bytes_per_expert_on_disk") or info.get("bytes_per_expert")
    if not chunk:
        raise ValueError(f"{info.get('path')}: no MoE layers to size the reads")
    return probe_read_bandwidth(info["path"], chunk, **kw)


def format_probe(result: dict) -> str:
    rates = ", ".join(f"{n} thr {r / 1e9:.2f}" for n, r in result["rates_bytes_per_s"].items())
    return (f"read probe ({result['chunk_bytes'] / 1e6:.2f} MB reads into {result['into']} memory, GB/s): {rates}; "
            f"best {result['best_bytes_per_s'] / 1e9:.2f} GB/s with {result['best_threads']} threads")
