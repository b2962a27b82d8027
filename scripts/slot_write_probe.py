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
- load: `mx.load` of a virtual safetensors file whose tensors are the experts' byte ranges
  in the real file (`VirtualSafetensors` below): MLX reads them into host memory and copies them to
  the device itself (on CUDA: a plain host-to-device copy into device memory), then the
  device scatters them into the slots.
- prefetch: in place, then the written rows migrated to the GPU in bulk with the CUDA
  driver's cuMemPrefetchAsync (through ctypes; CUDA only) before the products run.
- memcpy: the bytes staged in ordinary host memory, then copied into the slot's address by
  the CUDA driver (cuMemcpyHtoD; CUDA only): the copy engine writes the device's pages,
  nothing migrates.
- pinned: the same from page-locked staging (cuMemHostAlloc), as a reader thread would
  keep one per thread.
- async: every copy of the batch queued with cuMemcpyHtoDAsync from one page-locked
  buffer on a stream of its own, then one wait.
- dma: as async, with the bytes already in the page-locked buffer (the copies alone).
- compute: the products only (no writes), to subtract.

Prints per-iteration time and the effective write rate, host bytes / (time - compute).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import time

import mlx.core as mx
import numpy as np
from results import save_json

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


class VirtualSafetensors(io.RawIOBase):
    """A read-only safetensors "file" assembled from byte ranges of other files.

    `mx.load` of it makes MLX do what its checkpoint loader does: read into host memory and
    copy to device memory (on CUDA one host-to-device copy, not managed pages faulted over).

    `tensors` maps a name to (safetensors dtype, shape of one item, [(fd, offset, nbytes)
    per item]); the tensor is the items stacked: [len(items), *shape]."""

    def __init__(self, tensors: dict):
        super().__init__()
        header, segments, pos = {}, [], 0
        for name, (dtype, shape, items) in tensors.items():
            size = sum(n for _, _, n in items)
            header[name] = {"dtype": dtype, "shape": [len(items), *shape], "data_offsets": [pos, pos + size]}
            for fd, off, n in items:
                segments.append((pos, fd, off, n))
                pos += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._head = struct.pack("<Q", len(blob)) + blob
        self._segments = segments  # (virtual data position, fd, file offset, nbytes), in order
        self._size = len(self._head) + pos
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, out) -> int:
        mv = memoryview(out).cast("B")
        want = min(len(mv), self._size - self._pos)
        done = 0
        head = len(self._head)
        while done < want:
            pos = self._pos + done
            if pos < head:
                n = min(want - done, head - pos)
                mv[done : done + n] = self._head[pos : pos + n]
                done += n
                continue
            data_pos = pos - head
            seg = self._find(data_pos)
            start, fd, off, size = self._segments[seg]
            skip = data_pos - start
            n = min(want - done, size - skip)
            got = os.preadv(fd, [mv[done : done + n]], off + skip)
            if got <= 0:
                raise OSError(f"short read at offset {off + skip}")
            done += got
        self._pos += done
        return done

    def _find(self, data_pos: int) -> int:
        lo, hi = 0, len(self._segments) - 1
        while lo < hi:  # the last segment starting at or before data_pos
            mid = (lo + hi + 1) // 2
            if self._segments[mid][0] <= data_pos:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _driver():
    """The CUDA driver's cuMemPrefetchAsync and cuCtxSynchronize (ctypes), or None."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    prefetch = lib.cuMemPrefetchAsync
    prefetch.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    prefetch.restype = ctypes.c_int
    sync = lib.cuCtxSynchronize
    sync.restype = ctypes.c_int
    return prefetch, sync


class _Copier:
    """Host -> slot copies through the CUDA driver (ctypes): cuMemcpyHtoD into the managed
    address MLX gave the slot array, from pageable or page-locked staging."""

    def __init__(self, pinned_bytes: int = 0):
        import ctypes

        self.ct = ctypes
        lib = ctypes.CDLL("libcuda.so.1")
        self.lib = lib
        lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        lib.cuMemHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        ctx = ctypes.c_void_p()
        lib.cuCtxGetCurrent(ctypes.byref(ctx))
        if not ctx.value:  # MLX made the primary context current on its own threads only
            dev = ctypes.c_int()
            lib.cuInit(0)
            lib.cuDeviceGet(ctypes.byref(dev), 0)
            lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
            lib.cuCtxSetCurrent(ctx)
        self.staging = None
        if pinned_bytes:
            ptr = ctypes.c_void_p()
            err = lib.cuMemHostAlloc(ctypes.byref(ptr), pinned_bytes, 0)
            if err:
                raise OSError(f"cuMemHostAlloc returned {err}")
            self.staging = np.ctypeslib.as_array((ctypes.c_uint8 * pinned_bytes).from_address(ptr.value))

    def copy_async(self, dst: np.ndarray, src: np.ndarray, at: int, staged: bool = False):
        """Stage at byte `at` of the pinned buffer (unless `staged`: already there) and
        queue the copy; `sync` waits for all."""
        buf = self.staging[at : at + src.nbytes]
        if not staged:
            buf[:] = src.reshape(-1).view(np.uint8)
        err = self.lib.cuMemcpyHtoDAsync_v2(self.ct.c_uint64(dst.ctypes.data), self.ct.c_void_p(buf.ctypes.data),
                                            self.ct.c_size_t(src.nbytes), self.stream)
        if err:
            raise OSError(f"cuMemcpyHtoDAsync returned {err}")
        return at + src.nbytes

    def make_stream(self):
        s = self.ct.c_void_p()
        self.lib.cuStreamCreate(self.ct.byref(s), 1)  # non-blocking
        self.stream = s

    def sync(self):
        self.lib.cuStreamSynchronize(self.stream)

    def copy(self, dst: np.ndarray, src: np.ndarray):
        if self.staging is not None:
            buf = self.staging[: src.nbytes]
            buf[:] = src.reshape(-1).view(np.uint8)  # stands in for pread into the staging rows
            src = buf
        err = self.lib.cuMemcpyHtoD_v2(dst.ctypes.data, src.ctypes.data, src.nbytes)
        if err:
            raise OSError(f"cuMemcpyHtoD returned {err}")


def pool_file(pool, path="/tmp/slot_write_probe.bin"):
    """The pool's experts written back to back, and each (param, tensor) range per expert."""
    ranges, pos = [], 0
    with open(path, "wb") as f:
        for e in pool:
            r = {}
            for n in SHAPES:
                r[n] = []
                for a in e[n]:
                    f.write(a.tobytes())
                    r[n].append((pos, a.nbytes))
                    pos += a.nbytes
            ranges.append(r)
    return path, ranges


def run(method: str, slots: int, k: int, iters: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    p = make(slots)
    pool = host_experts(16, rng)
    if method == "load":
        path, ranges = pool_file(pool)
        fd = os.open(path, os.O_RDONLY)
    x = mx.random.normal((k, 1, 1, 2048)).astype(mx.bfloat16)
    views = None
    copier = None
    if method in ("memcpy", "pinned", "async", "dma"):
        try:
            copier = _Copier(pinned_bytes={"memcpy": 0, "pinned": 4 << 20, "async": 32 << 20, "dma": 32 << 20}[method])
            if method in ("async", "dma"):
                copier.make_stream()
        except OSError as e:
            return {"method": method, "ms_per_iter": float("nan"), "bytes_per_iter": 0, "error": str(e)}
    if method in ("inplace", "prefetch", "memcpy", "pinned", "async", "dma"):
        views = {n: [_host_view(a) for a in arrs] for n, arrs in p.items()}
    driver = _driver() if method == "prefetch" else None
    if method == "prefetch" and driver is None:
        return {"method": method, "ms_per_iter": float("nan"), "bytes_per_iter": 0, "error": "no libcuda.so.1"}
    times = []
    nbytes = 0
    for it in range(iters + 3):
        sl = rng.choice(slots, k, replace=False)
        src = [pool[int(i)] for i in rng.integers(0, len(pool), k)]
        if method == "dma":  # staged before the clock starts: the copy engine's rate alone
            at = 0
            for e in src:
                for n in SHAPES:
                    for data in e[n]:
                        copier.staging[at : at + data.nbytes] = data.reshape(-1).view(np.uint8)
                        at += data.nbytes
        t0 = time.perf_counter()
        if method in ("inplace", "prefetch"):
            for s, e in zip(sl.tolist(), src):
                for n in SHAPES:
                    for v, data in zip(views[n], e[n]):
                        v[s] = data
                        if driver is not None:
                            err = driver[0](v[s].ctypes.data, v[s].nbytes, 0, None)
                            if err:
                                return {"method": method, "ms_per_iter": float("nan"), "bytes_per_iter": 0,
                                        "error": f"cuMemPrefetchAsync returned {err}"}
            if driver is not None:
                driver[1]()
        elif method in ("async", "dma"):
            at = 0
            for s, e in zip(sl.tolist(), src):
                for n in SHAPES:
                    for v, data in zip(views[n], e[n]):
                        at = copier.copy_async(v[s], data, at, staged=method == "dma")
            copier.sync()
        elif copier is not None:
            for s, e in zip(sl.tolist(), src):
                for n in SHAPES:
                    for v, data in zip(views[n], e[n]):
                        copier.copy(v[s], data)
        elif method == "functional":
            ids = mx.array(sl.astype(np.uint32))
            for n in SHAPES:
                for j in range(3):
                    staged = mx.array(np.stack([e[n][j] for e in src]))
                    if j:
                        staged = mx.view(staged, mx.bfloat16)
                    p[n][j][ids] = staged
        elif method == "load":
            picks = [int(i) for i in rng.integers(0, len(pool), k)]
            tensors = {}
            for n, (r, c) in SHAPES.items():
                groups = c * 8 // 64
                for j, (dt, shape) in enumerate([("U32", (r, c)), ("BF16", (r, groups)), ("BF16", (r, groups))]):
                    tensors[f"{n}.{j}"] = (dt, shape, [(fd, *ranges[e][n][j]) for e in picks])
            loaded = mx.load(VirtualSafetensors(tensors), format="safetensors")
            ids = mx.array(sl.astype(np.uint32))
            for n in SHAPES:
                for j in range(3):
                    p[n][j][ids] = loaded[f"{n}.{j}"]
        idx = mx.array(sl.astype(np.uint32)).reshape(k, 1, 1)
        y = products(p, x, idx)
        mx.eval(y)
        if it >= 3:
            times.append(time.perf_counter() - t0)
            nbytes += 0 if method == "compute" else k * sum(a.nbytes for n in SHAPES for a in src[0][n])
    t = float(np.median(times))
    out = {"method": method, "ms_per_iter": t * 1e3, "bytes_per_iter": nbytes / iters}
    if method != "compute":  # the last iteration's experts are in their slots, bit for bit
        for n in SHAPES:
            for j in range(3):
                got = np.array(mx.view(p[n][j][mx.array(sl.astype(np.uint32))], mx.uint32 if j == 0 else mx.uint16))
                want = np.stack([e[n][j] for e in src]) if method != "load" else None
                if want is not None and not np.array_equal(got, want):
                    out["error"] = f"{n}.{j}: the slots do not hold what was written"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--methods", default="compute,inplace,functional,load",
                    help="ways of writing to compare (also: prefetch, memcpy, pinned, async, dma: CUDA only)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    methods = args.methods.split(",")
    rows = [run(m, args.slots, args.k, args.iters) for m in methods + methods]
    base = min(r["ms_per_iter"] for r in rows if r["method"] == "compute")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:>10}: {r['error']}")
            continue
        extra = r["ms_per_iter"] - base
        r["write_GBps"] = r["bytes_per_iter"] / (extra / 1e3) / 1e9 if r["bytes_per_iter"] and extra > 0 else None
        print(f"{r['method']:>10}: {r['ms_per_iter']:8.3f} ms/iter"
              + (f"  {r['bytes_per_iter'] / 1e6:6.1f} MB  {r['write_GBps']:.2f} GB/s" if r["write_GBps"] else ""), flush=True)
    save_json(args.json, {"device": str(mx.default_device()), "args": vars(args), "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
