"""Whether MLX's CUDA backend runs two streams' kernels at once, and whether a kernel on one
stream may wait for a flag that another stream's kernel sets (device-fetch's copies beside
compute, docs/device_fetch.md "Next").

    python scripts/stream_overlap.py [--mb 128] [--products 200] [--repeats 5] [--json OUT]

Times, each the median of `--repeats` evaluations: products alone (a chain of memory-bound
matrix-vector products, like decode), a pull of `--mb` MB from page-locked host memory alone
(wait_kernels' copy kernel, over PCIe), both on one stream, and the pull on a second stream.
Then a handshake with no MLX dependency between the streams: the main stream runs products,
posts a flag, runs more products, then waits for a `done` flag; the second stream waits for the
post, pulls, and sets `done`. Spins are bounded: a timed-out wait is reported, never a hang.
CUDA only.
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

# flag[0]: posted by the main stream; flag[1]: done, by the second; flag[2]/[3]: a wait timed out.
_POST = """
    unsigned int* f = const_cast<unsigned int*>(flag);
    __threadfence_system();
    atomicExch(f + WHICH, tag[0]);
    out[0] = 0u;
"""
_WAIT = """
    unsigned int* f = const_cast<unsigned int*>(flag);
    unsigned long long spins = 0;
    while (atomicAdd(f + WHICH, 0u) != tag[0]) {
        __nanosleep(200);
        if (++spins > (1ull << 24)) { atomicExch(f + 2 + WHICH, 1u); break; }
    }
    __threadfence();
    out[0] = (unsigned int)spins;
"""
_kernels: dict = {}


def _kernel(name: str, source: str):
    if name not in _kernels:
        _kernels[name] = mx.fast.cuda_kernel(name=f"chronos_probe_{name}", input_names=["flag", "tag", "after"],
                                             output_names=["out"], source=source)
    return _kernels[name]


def signal(flag, tag, after, which: int, stream=None):
    return _kernel("post", _POST)(inputs=[flag, tag, after], template=[("WHICH", which)], grid=(1, 1, 1),
                                  threadgroup=(1, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.uint32],
                                  stream=stream)[0]


def wait(flag, tag, after, which: int, stream=None):
    return _kernel("wait", _WAIT)(inputs=[flag, tag, after], template=[("WHICH", which)], grid=(1, 1, 1),
                                  threadgroup=(1, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.uint32],
                                  stream=stream)[0]


def products(w, x, n: int):
    for _ in range(n):
        x = mx.tanh(w @ x)
    return x


def timed(build, repeats: int) -> float:
    ts = []
    for i in range(repeats + 2):
        outs = build()
        t0 = time.perf_counter()
        mx.eval(outs)
        if i >= 2:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=128)
    ap.add_argument("--products", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    from chronos_mlx import wait_kernels
    from chronos_mlx.cache import _numpy_view
    from chronos_mlx.wait_kernels import pull_copies

    if not wait_kernels.available():
        sys.exit("stream_overlap.py needs MLX's CUDA backend")
    total = args.mb << 20
    staging = wait_kernels.pinned_alloc(wait_kernels.driver())(total)
    staging[:] = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    dest = mx.zeros((total // 4,), dtype=mx.uint32)
    w = (mx.random.normal((8192, 8192)) * 0.01).astype(mx.bfloat16)
    x0 = mx.random.normal((8192, 1)).astype(mx.bfloat16)
    flag = mx.zeros((4,), dtype=mx.uint32)
    mx.eval(dest, w, x0, flag)
    view = _numpy_view(dest).view(np.uint8)
    chunk = 4 << 20  # expert-sized pieces, as a plan lists them
    copies = []
    for off in range(0, total, chunk):
        copies += [staging.ctypes.data + off, view.ctypes.data + off, min(chunk, total - off)]
    plan = mx.array(np.array([len(copies) // 3] + copies, dtype=np.uint64))
    s2 = mx.new_stream(mx.gpu)
    one = mx.zeros((1,), dtype=mx.uint32)
    n = args.products
    rows = {}
    rows["products_s"] = timed(lambda: products(w, x0, n), args.repeats)
    rows["pull_s"] = timed(lambda: pull_copies(plan, one), args.repeats)
    rows["both_one_stream_s"] = timed(lambda: [products(w, x0, n), pull_copies(plan, one)], args.repeats)

    def two_streams():
        with mx.stream(s2):
            pulled = pull_copies(plan, one)
        return [pulled, products(w, x0, n)]

    rows["both_two_streams_s"] = timed(two_streams, args.repeats)
    view[:] = 0
    mx.eval(two_streams())
    rows["bytes_right"] = bool(np.array_equal(np.array(dest).view(np.uint8), staging))

    # The handshake: main = products(n/4) -> post -> products(n/2) -> wait(done) -> products(n/4);
    # second stream = wait(post) -> pull -> signal(done). Ideal: n/4 + max(n/2, pull) + n/4.
    counter = [0]
    flags = _numpy_view(flag)

    def handshake():
        counter[0] += 1
        tag = mx.array([counter[0]], dtype=mx.uint32)
        with mx.stream(s2):
            got = wait(flag, tag, one, 0)
            pulled = pull_copies(plan, got)
            done = signal(flag, tag, pulled, 1)
        a = products(w, x0, n // 4)
        posted = signal(flag, tag, a, 0)
        b = products(w, x0 + posted[0].astype(mx.bfloat16), n // 2)
        waited = wait(flag, tag, b, 1)
        c = products(w, b + waited[0].astype(mx.bfloat16), n // 4)
        return [done, c]

    for order in ("second-first", "main-first"):
        flags[:] = 0

        def build():
            outs = handshake()
            return outs if order == "second-first" else outs[::-1]

        rows[f"handshake_{order}_s"] = timed(build, args.repeats)
        rows[f"handshake_{order}_timeouts"] = flags[2:].tolist()
    ideal = rows["products_s"] / 2 + max(rows["products_s"] / 2, rows["pull_s"])
    rows["handshake_ideal_s"] = ideal
    rows["overlap"] = (rows["both_one_stream_s"] - rows["both_two_streams_s"]) / max(
        min(rows["products_s"], rows["pull_s"]), 1e-9)
    for k, v in rows.items():
        print(f"{k:34s} {v * 1e3 if isinstance(v, float) and k.endswith('_s') else v}", flush=True)
    save_json(args.json, {"device": str(mx.default_device()), "mb": args.mb, "products": n, **rows}, indent=1)


if __name__ == "__main__":
    main()
