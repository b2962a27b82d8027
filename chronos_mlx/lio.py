"""Many reads in flight from one Python call: POSIX `lio_listio` (Linux glibc).

Reading one request's experts over Python threads costs a hand-off per piece, and each thread
must take Python's lock back after its `pread`: with the decode loop's main thread busy building
a step, that wait is a whole switch interval (5 ms) per piece. `lio_listio(LIO_WAIT, ...)` hands
every piece to glibc's own I/O threads and returns when all are in, releasing Python's lock once
(ctypes). Measured on the H200 host (16 cores, page cache, `scripts/read_paths.py`): one 2.65 MB
expert in 109 us over 8 pieces against 331 us for one `pread` and 214 us for the best Python-thread
split; with a busy interpreter 5.4 ms for four experts against 22-47 ms.

glibc serialises the requests of one file descriptor (one thread per descriptor: two 4 MB
pieces took 704 us through one descriptor and 448 us through two on a 2-core box), so callers
pass each piece with one of several `dup`s of the shard's descriptor. Only glibc's `struct aiocb`
layout is declared here; elsewhere (macOS, musl) `available()` is False and callers use threads.
`CHRONOS_LIO=0` turns it off."""

import ctypes
import errno
import os
import sys
import threading
import time

LIO_READ = 0  # glibc <aio.h>
LIO_WAIT = 0
SIGEV_NONE = 1


class _Aiocb(ctypes.Structure):  # glibc's struct aiocb, 64-bit (off_t is 64 bits there)
    # (its struct sigevent, 64 bytes, spelled out in place: value, signo, notify, padding)
    _fields_ = [("fildes", ctypes.c_int), ("lio_opcode", ctypes.c_int), ("reqprio", ctypes.c_int),
                ("buf", ctypes.c_void_p), ("nbytes", ctypes.c_size_t),
                ("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int), ("sigev_notify", ctypes.c_int),
                ("sigev_pad", ctypes.c_byte * 48),
                ("next_prio", ctypes.c_void_p), ("abs_prio", ctypes.c_int), ("policy", ctypes.c_int),
                ("error_code", ctypes.c_int), ("return_value", ctypes.c_ssize_t), ("offset", ctypes.c_int64),
                ("reserved", ctypes.c_char * 32)]


class _AioInit(ctypes.Structure):  # struct aioinit
    _fields_ = [(name, ctypes.c_int) for name in ("threads", "num", "locks", "usedba", "debug", "numusers",
                                                  "idle_time", "reserved")]


_SIGSET_BYTES = 128  # glibc's sigset_t
_SIG_BLOCK, _SIG_SETMASK = 0, 2  # Linux
_lock = threading.Lock()
_fn = None
_tried = False


def _load():
    global _fn, _tried
    with _lock:
        if _tried:
            return _fn
        _tried = True
        if (os.environ.get("CHRONOS_LIO", "1") == "0" or not sys.platform.startswith("linux")
                or ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(_Aiocb) != 168):
            return None
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            fn = libc.lio_listio
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]  # list: aiocb addresses
            fn.restype = ctypes.c_int
            # Keep glibc's I/O threads for a minute between batches (default: 1 s, then each
            # batch would start its threads again) and allow as many as the reader uses.
            init = _AioInit(threads=32, num=256, idle_time=60)
            libc.aio_init(ctypes.byref(init))
            libc.aio_error.argtypes = [ctypes.c_void_p]
            libc.aio_error.restype = ctypes.c_int
            # pthread_sigmask through PyDLL: it keeps Python's lock (a release could cost a
            # switch interval with the main thread busy), and a prebuilt set spares
            # signal.pthread_sigmask's conversion of ~60 signals to enums, twice a call.
            sigmask = ctypes.PyDLL("libc.so.6").pthread_sigmask
            sigmask.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            sigmask.restype = ctypes.c_int
            every = (ctypes.c_ubyte * _SIGSET_BYTES)()
            if libc.sigfillset(every) != 0:
                return None
        except (OSError, AttributeError):  # not glibc
            return None
        _fn = (fn, libc.aio_error, sigmask, every)
        return _fn


def _wait_out(aio_error, ptrs):
    """Return once no piece is in flight (a Ctrl-C meanwhile is raised afterwards)."""
    interrupted = None
    for p in ptrs:
        while True:
            try:
                if aio_error(p) != errno.EINPROGRESS:
                    break
                time.sleep(20e-6)
            except BaseException as e:  # noqa: BLE001 - the buffers first, then the interrupt
                interrupted = interrupted or e
    if interrupted is not None:
        raise interrupted


def available() -> bool:
    """Whether `read_pieces` can run here (Linux glibc, 64-bit, not turned off)."""
    return _load() is not None


def read_pieces(pieces: list) -> list:
    """Fill each writable buffer of `pieces` [(fd, offset, buffer)] from its descriptor, all
    in flight at once; returns the bytes each read (short only at the end of a file). Raises
    OSError if a read failed. Pieces on one descriptor are read one after another."""
    loaded = _load()
    if loaded is None:
        raise OSError("lio_listio is not available here")
    fn, aio_error, sigmask, every = loaded
    n = len(pieces)
    if not n:
        return []
    cbs = (_Aiocb * n)()  # zeroed: lio_opcode LIO_READ
    size, base = ctypes.sizeof(_Aiocb), ctypes.addressof(cbs)
    ptrs = (ctypes.c_void_p * n)(*range(base, base + n * size, size))
    keep = []  # the ctypes views pin the buffers until the call returns
    for cb, (fd, offset, buf) in zip(cbs, pieces):
        nbytes = len(buf)
        if nbytes:
            first = ctypes.c_char.from_buffer(buf)  # its first byte (and a hold on the buffer)
            keep.append(first)
            cb.buf = ctypes.addressof(first)
        cb.fildes, cb.offset, cb.nbytes, cb.sigev_notify = fd, offset, nbytes, SIGEV_NONE
    # No signal handler may run on this thread during the wait: glibc's LIO_WAIT keeps its
    # wait list on its stack, and a wait cut short by EINTR returns while the I/O threads
    # still write to that list (a segfault, seen here with SIGUSR1 every 0.5 ms). Blocked,
    # a signal goes to another thread or waits the ~0.1-1 ms until the mask is restored.
    old_mask = (ctypes.c_ubyte * _SIGSET_BYTES)()
    if sigmask(_SIG_BLOCK, every, old_mask) != 0:
        raise OSError("lio_listio: pthread_sigmask failed")
    try:
        rc = fn(LIO_WAIT, ptrs, n, None)
        err = ctypes.get_errno() if rc != 0 else 0
    finally:
        sigmask(_SIG_SETMASK, old_mask, None)
    if rc != 0:
        # EIO: some piece failed; EAGAIN: not all were queued. Every queued one has ended.
        _wait_out(aio_error, ptrs)
        failed = [c for c in (aio_error(p) for p in ptrs) if c > 0]
        code = failed[0] if failed else err
        raise OSError(code, f"lio_listio: {os.strerror(code) if code else 'failed'}")
    del keep
    return [int(cbs[i].return_value) for i in range(n)]
