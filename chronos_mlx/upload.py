"""Putting expert bytes where a CUDA GPU reads them.

On Apple silicon (and MLX's CPU backend) the slot arrays are plain shared memory: reads
land in them directly and there is nothing to do. MLX's CUDA backend allocates managed
memory: a host write pulls each page over to the host and the GPU's next read faults it
back, page by page (an H200 took 1.2-1.4 GB/s that way, `scripts/slot_write_probe.py`).
There the reads land in page-locked staging memory of the reading thread and the GPU's
copy engine writes the slots (`cuMemcpyHtoDAsync` of the CUDA driver, through ctypes):
16-18 GB/s for the copies alone on that machine, nothing migrates.

`device_upload()` is the one platform switch: a `DeviceUpload` on CUDA, None elsewhere
(and where the driver cannot be loaded, or CHRONOS_DEVICE_COPY=0): then the plain host
writes are used.
"""

from __future__ import annotations

import ctypes
import os
import threading

import mlx.core as mx
import numpy as np

# Page-locked staging per reading thread is at most this large (one expert larger than it
# still fits); bigger batches (a prefill wave, a whole layer at start-up) go in pieces.
MAX_STAGING = 64 << 20


class DeviceUpload:
    """Copies from page-locked staging into slot memory through the CUDA driver.

    Each thread that reads experts has its own staging buffer and stream (demand loads on
    the main thread, prefetches on pool threads run side by side); `copy` returns once
    every copy it queued is complete, so a slot written this way is like one the host
    wrote: the caller maps the expert afterwards. `copy(..., wait=False)` leaves them
    queued for the thread's next `copy` or `wait` (a stream wait costs ~0.1 ms on an H200:
    a loading layer's experts and its gate table then share one); until then the thread
    stages nothing new (`staging` waits first) and nothing may compute with those slots."""

    def __init__(self, lib):
        """`lib`: the CUDA driver (`_driver()`), or anything with the same few calls."""
        self._lib = lib
        self._local = threading.local()
        self.copies = 0
        self.bytes = 0
        # The driver's first refusal, in words: from then on the cache writes from the host
        # (`ExpertCache._upload_for`), which is slower on CUDA but always works.
        self.failed: str | None = None

    def _check(self, err: int, what: str):
        if err:
            raise OSError(f"CUDA driver: {what} returned error {err}")

    def _thread_state(self) -> "_ThreadStaging":
        """This thread's stream and staging: the primary context made current first (MLX
        makes it current only on the threads it runs on)."""
        st = self._local.__dict__.get("state")
        if st is None:
            lib = self._lib
            make_context_current(lib)
            stream = ctypes.c_void_p()
            self._check(lib.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")  # non-blocking
            st = self._local.state = _ThreadStaging(lib, stream)
        return st

    def staging(self, nbytes: int) -> np.ndarray:
        """This thread's page-locked staging, at least `nbytes` (uint8)."""
        st = self._thread_state()
        if st.queued:  # copies still read the staging: they finish before it is rewritten
            self.wait()
        if st.buf is None or len(st.buf) < nbytes:
            st.ptr, st.buf = self._alloc(max(1 << 20, 1 << (max(nbytes, 1) - 1).bit_length()), st.ptr)
        return st.buf

    def _alloc(self, size: int, old):
        """(pointer, uint8 array) of `size` page-locked bytes; `old` (a pointer or None) is
        given back once the new one is had."""
        ptr = ctypes.c_void_p()
        self._check(self._lib.cuMemHostAlloc(ctypes.byref(ptr), size, 0), "cuMemHostAlloc")
        if old is not None:
            self._lib.cuMemFreeHost(old)
        return ptr, np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(ptr.value))

    def copy(self, copies: list, wait: bool = True, source: np.ndarray | None = None):
        """Queue [(slot array address, destination address, offset in `source` — this
        thread's staging by default — nbytes)] and, with `wait`, wait for them and for any
        this thread left queued. Copies that continue each other on both sides within one
        slot array go as one; never across arrays (MLX may place two arrays back to back,
        and one copy must not span two allocations: the driver refuses it)."""
        st = self._thread_state()
        base = (st.buf if source is None else source).ctypes.data
        stream = st.stream
        fn = self._lib.cuMemcpyHtoDAsync_v2
        merged = []
        for array, dst, off, n in sorted(copies):
            last = merged[-1] if merged else None
            if last and last[0] == array and last[1] + last[3] == dst and last[2] + last[3] == off:
                last[3] += n
            else:
                merged.append([array, dst, off, n])
        pending = st.queued + [(dst, base + off, n) for _, dst, off, n in merged]
        try:
            for _, dst, off, n in merged:
                self._check(fn(dst, base + off, n, stream), "cuMemcpyHtoDAsync")
            st.queued = pending
            if wait:
                self.wait()
        except OSError as e:
            self._write_from_host(st, pending, str(e))
            return
        self.copies += len(merged)
        self.bytes += sum(n for *_, n in merged)

    def wait(self):
        """Wait for the copies this thread left queued (`copy(..., wait=False)`)."""
        st = self._thread_state()
        if not st.queued:
            return
        try:
            self._check(self._lib.cuStreamSynchronize(st.stream), "cuStreamSynchronize")
        except OSError as e:
            self._write_from_host(st, st.queued, str(e))
            return
        st.queued = []

    def _write_from_host(self, st, pending: list, error: str):
        # The bytes are still in the staging: the host writes them (managed memory is host
        # memory too), so the loads complete; later loads take the host path.
        self._lib.cuStreamSynchronize(st.stream)  # nothing queued may still be copying
        for dst, src, n in pending:
            ctypes.memmove(dst, src, n)
        st.queued = []
        self.failed = error

    def table_staging(self, nbytes: int) -> np.ndarray:
        """A second, small page-locked buffer of this thread (uint8, at least `nbytes`):
        gate tables staged here can queue behind expert copies still reading `staging`."""
        st = self._thread_state()
        if st.table is None or len(st.table) < nbytes:
            if st.table is not None and st.queued:  # queued copies may read the one given back
                self.wait()
            st.table_ptr, st.table = self._alloc(max(4096, nbytes), st.table_ptr)
        return st.table


class _ThreadStaging:
    """One thread's stream and page-locked buffer, given back to the driver when the thread
    ends (its thread-local state goes): a server that starts threads leaks nothing. A thread
    waits for what it queued before it stages again or ends its step, so nothing still reads
    the buffers then."""

    def __init__(self, lib, stream):
        self.lib, self.stream, self.ptr, self.buf = lib, stream, None, None
        self.table_ptr, self.table = None, None  # `table_staging`
        self.queued: list = []  # (dst, src, nbytes) copies queued but not waited for

    def free_buffer(self):
        self.buf = self.table = None
        for ptr in (self.ptr, self.table_ptr):
            if ptr is not None:
                self.lib.cuMemFreeHost(ptr)
        self.ptr = self.table_ptr = None

    def __del__(self):
        try:
            self.free_buffer()
            self.lib.cuStreamDestroy_v2(self.stream)
        except Exception:  # interpreter shutdown: the process gives everything back anyway
            pass


def make_context_current(lib):
    """Make the device's primary context current on this thread (MLX makes it current only on
    the threads it runs on; a driver call elsewhere fails with CUDA_ERROR_INVALID_CONTEXT)."""

    def check(err, what):
        if err:
            raise OSError(f"CUDA driver: {what} returned error {err}")

    ctx = ctypes.c_void_p()
    check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        dev = ctypes.c_int()
        check(lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def _driver():
    """libcuda with the signatures of the calls DeviceUpload makes (ctypes would otherwise
    pass 64-bit addresses as 32-bit ints)."""
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.cuMemHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
    lib.cuMemFreeHost.argtypes = [ctypes.c_void_p]
    lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
    lib.cuStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
    lib.cuStreamDestroy_v2.argtypes = [ctypes.c_void_p]
    return lib


def slot_address(view: np.ndarray) -> int:
    """The address of a slot array's first byte (managed memory: the same on host and device)."""
    return view.ctypes.data


def device_upload() -> DeviceUpload | None:
    """A DeviceUpload when the default device is a CUDA GPU, else None (host writes)."""
    if os.environ.get("CHRONOS_DEVICE_COPY", "1") == "0":
        return None
    try:
        if mx.default_device() != mx.gpu or not mx.cuda.is_available():
            return None
        lib = _driver()
    except (AttributeError, OSError):
        return None
    return DeviceUpload(lib)


def expert_write_path() -> str:
    """How expert bytes reach what the kernels read on this machine's default device, in words."""
    if device_upload() is not None:
        return "CUDA copy engine from page-locked staging (the slots are managed memory)"
    if mx.default_device() == mx.gpu:
        return "read straight into the slots (unified memory)"
    return "read straight into the slots (MLX's CPU backend)"
