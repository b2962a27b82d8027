"""Where a demand load's time goes, phase by phase, on this machine's write path (issue 12).

    python scripts/load_phases.py [--model DIR] [--budget 0.5] [--experts 1,2,4] [--calls 200]
                                  [--threads 1,4,16] [--waits one,each] [--layers 1,48]
                                  [--json OUT]

Loads `--experts` absent experts per call into one layer after another (as per-layer routing
does under misses, without decoding in between) and times, per call: the whole `load_for`,
the reads (`ShardReader.read_runs` or the lean `_read_small`), and on CUDA the device copies
(`DeviceUpload.copy`: the experts' and the gate table's). For each reader thread count (at
most the reader's own) and each way of waiting for the copies: `one` (the experts' and
the table's copies share one stream wait, as per-layer routing does) or `each` (a wait
after each). Prints milliseconds per call and the effective rate; what is not reads or
copies is bookkeeping. `--layers N` loads that many layers per call as one batch
(`Runtime.load_layers`, what a recovery after a failed optimistic step does).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from pathlib import Path
import sys

import numpy as np
from results import save_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Timer:
    """Wall time spent inside a wrapped call (the main thread's calls only; copies made by
    reader threads are counted apart, summed over threads)."""

    def __init__(self):
        self.main = 0.0
        self.other = 0.0
        self.calls = 0
        self.lock = threading.Lock()

    def wrap(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                with self.lock:
                    self.calls += 1
                    if threading.current_thread() is threading.main_thread():
                        self.main += dt
                    else:
                        self.other += dt

        return timed


def measure(rt, k: int, calls: int, rng, one_wait: bool = True, together: int = 1) -> dict:
    cache = rt.cache
    reads, small, copies = _Timer(), _Timer(), _Timer()
    cache.reader.read_runs = reads.wrap(cache.reader.read_runs)
    cache._read_small = small.wrap(cache._read_small)
    if cache.upload is not None:
        cache.upload.copy = copies.wrap(cache.upload.copy)
        cache.upload.wait = copies.wrap(cache.upload.wait)
    n_layers = len(cache.layers)
    total, loaded = 0.0, 0
    for i in range(calls):
        wanted = {}
        for j in range(together):
            layer = (i * together + j) % n_layers
            absent = np.flatnonzero(cache.layers[layer].slot_of < 0)
            wanted[layer] = rng.choice(absent, min(k, len(absent)), replace=False).tolist()
        t = time.perf_counter()
        with cache.one_copy_wait() if one_wait else contextlib.nullcontext():
            if together == 1:
                [(layer, want)] = wanted.items()
                got = rt.load_for(layer, want)
                rt.cache.mark_used(layer, want)
                rt.cache.write_gate_table(layer)
            else:
                got = [e for g in rt.load_layers(wanted).values() for e in g]
                for layer, want in wanted.items():
                    rt.cache.mark_used(layer, want)
        total += time.perf_counter() - t
        loaded += len(got)
    del cache.reader.read_runs, cache._read_small
    if cache.upload is not None:
        del cache.upload.copy, cache.upload.wait
    nbytes = loaded * cache.bytes_on_disk_per_expert
    return {
        "waits": "one" if one_wait else "each",
        "layers_per_call": together,
        "experts_per_call": k * together,
        "ms_per_call": total / calls * 1e3,
        "reads_ms_per_call": (reads.main + small.main) / calls * 1e3,
        "copies_ms_per_call": (copies.main + copies.other) / calls * 1e3,
        "effective_gb_per_s": nbytes / total / 1e9 if total else 0.0,
        "lean_path_calls": small.calls,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--experts", default="1,2,4")
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--waits", default="one,each", help="one: a load's copies share one stream wait; each: a wait per copy")
    ap.add_argument("--layers", default="1", help="layers loaded per call as one batch (recoveries load many)")
    ap.add_argument("--json")
    args = ap.parse_args()

    import chronos_mlx

    _, _, rt = chronos_mlx.load(args.model, expert_budget=args.budget)
    print(f"{rt.cache.bytes_on_disk_per_expert / 1e6:.2f} MB per expert; reader threads "
          f"{rt.cache.reader.threads}; device copies: {rt.cache.upload is not None}", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    default_threads = rt.cache.reader.threads
    for threads in [int(t) for t in args.threads.split(",")]:
        rt.cache.reader.threads = min(threads, default_threads)
        for k in [int(x) for x in args.experts.split(",")]:
            for together in [int(x) for x in args.layers.split(",")]:
                for waits in args.waits.split(","):
                    one = waits == "one"
                    calls = max(4, args.calls // together)
                    measure(rt, k, max(2, calls // 10), rng, one, together)  # warm-up
                    row = {"threads": rt.cache.reader.threads, **measure(rt, k, calls, rng, one, together)}
                    rows.append(row)
                    print(" ".join(f"{key}={v:.3f}" if isinstance(v, float) else f"{key}={v}" for key, v in row.items()),
                          flush=True)
    save_json(args.json, {"budget": args.budget, "rows": rows}, indent=2)


if __name__ == "__main__":
    main()
