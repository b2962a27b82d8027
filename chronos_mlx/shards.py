"""Where every tensor lives in a model's safetensors shards, validated, and how to read it.

`ShardIndex` parses and checks the shard headers (without touching tensor data) and
`ShardReader` reads byte ranges with `os.preadv` into caller-owned buffers, optionally
bypassing the page cache (O_DIRECT on Linux, F_NOCACHE on macOS). A batch of ranges is one
submission: readahead hints first (so a drive has them all in flight), then one vectored
read per run of ranges that touch on disk.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import lio
from .errors import ShardError

# safetensors dtype name -> (numpy dtype, item size)
DTYPES = {
    "BOOL": (np.bool_, 1),
    "U8": (np.uint8, 1),
    "I8": (np.int8, 1),
    "U16": (np.uint16, 2),
    "I16": (np.int16, 2),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),  # numpy has no bfloat16: carried as raw 16-bit words
    "U32": (np.uint32, 4),
    "I32": (np.int32, 4),
    "F32": (np.float32, 4),
    "U64": (np.uint64, 8),
    "I64": (np.int64, 8),
    "F64": (np.float64, 8),
    "F8_E4M3": (np.uint8, 1),
    "F8_E5M2": (np.uint8, 1),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of one shard: absolute byte range in the file, dtype and shape."""

    name: str
    path: Path
    offset: int  # absolute, from the start of the file
    nbytes: int
    dtype: str  # safetensors name, e.g. "U32", "BF16"
    shape: tuple


@dataclass
class ShardIndex:
    """Every tensor of a checkpoint, from validated shard headers."""

    root: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    file_sizes: dict[Path, int] = field(default_factory=dict)
    # (size, mtime_ns, ctime_ns, inode, device) of each shard when it was indexed
    signatures: dict[Path, tuple] = field(default_factory=dict)
    _expected: dict = field(default_factory=dict, repr=False)  # path -> (its str, its signature)

    @classmethod
    def open(cls, model_dir) -> "ShardIndex":
        root = Path(model_dir)
        files = _shard_files(root)
        index = cls(root)
        for path in files:
            for info in _read_header(path):
                if info.name in index.tensors:
                    raise ShardError(
                        f"{path.name}: tensor '{info.name}' also appears in "
                        f"{index.tensors[info.name].path.name}"
                    )
                index.tensors[info.name] = info
            sig = stat_signature(path)
            index.file_sizes[path] = sig[0]
            index.signatures[path] = sig
        _check_weight_map(root, index)
        return index

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __getitem__(self, name) -> TensorInfo:
        return self.tensors[name]

    def check_unchanged(self, path: Path):
        """Refuse to read a shard that changed since it was indexed: replaced, truncated,
        or rewritten in place with the same size (a copy over it, a corrupted write).

        One `stat` (about a microsecond): size, modification and status-change times in
        nanoseconds, inode and device. Any difference is a ShardError, never garbage."""
        expected = self._expected.get(path)
        if expected is not None:  # the common case, lean: it runs before every batch of reads
            try:
                st = os.stat(expected[0])
                if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev) == expected[1]:
                    return
            except OSError:
                pass  # explained below
        elif path in self.signatures:
            self._expected[path] = (os.fspath(path), self.signatures[path])
        try:
            sig = stat_signature(path)
        except FileNotFoundError:
            raise ShardError(f"{path}: shard file disappeared while the model was in use") from None
        except OSError as e:
            raise ShardError(f"{path}: cannot stat shard ({e.strerror or e})") from None
        old = self.signatures.get(path)
        if old is None:  # an index built by hand (tests): sizes only
            old = (self.file_sizes[path],) + sig[1:]
        if sig != old:
            if sig[0] != old[0]:
                what = f"changed size ({old[0]} -> {sig[0]} bytes)"
            elif sig[3:] != old[3:]:
                what = "was replaced by another file"
            else:
                what = "was modified"
            raise ShardError(
                f"{path}: shard {what} while the model was in use; refusing to read it "
                "(restart chronos to load the current file)"
            )


def stat_signature(path) -> tuple:
    """What identifies a file's contents without reading them: (size, mtime_ns, ctime_ns, inode, device)."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _weight_map(index_file: Path) -> dict:
    """The index's weight map, checked: a JSON object of tensor name -> shard file name
    (a plain name in the model directory)."""
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"{index_file}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise ShardError(f"{index_file}: cannot read ({e.strerror or e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ShardError(f"{index_file}: not a valid safetensors index ('weight_map' must be an object)")
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or fname != Path(fname).name or fname in (".", ".."):
            raise ShardError(f"{index_file}: tensor '{name}' maps to {fname!r}, not a shard file name")
    return weight_map


def _shard_files(root: Path) -> list[Path]:
    index_file = root / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = _weight_map(index_file)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).exists()]
        if missing:
            raise ShardError(
                f"{root}: shard file(s) named in model.safetensors.index.json are missing: "
                + ", ".join(missing)
            )
        return [root / n for n in names]
    try:
        files = sorted(root.glob("model*.safetensors"))
    except OSError as e:
        raise ShardError(f"{root}: cannot list the model directory ({e.strerror or e})") from None
    if not files:
        raise ShardError(f"{root}: no model*.safetensors shards found")
    return files


def _check_weight_map(root: Path, index: ShardIndex):
    index_file = root / "model.safetensors.index.json"
    if not index_file.exists():
        return
    weight_map = _weight_map(index_file)
    for name, fname in weight_map.items():
        info = index.tensors.get(name)
        if info is None:
            raise ShardError(f"{root / fname}: tensor '{name}' named in the index is not in the shard")
        if info.path.name != fname:
            raise ShardError(
                f"{root}: index puts '{name}' in {fname} but it is in {info.path.name}"
            )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_header(path: Path) -> list[TensorInfo]:
    """Parse and validate one shard's header the way the safetensors reader does: every
    entry an object with a known dtype string, a shape of non-negative integers and two
    integer offsets, its byte count = shape x dtype size, the offsets contiguous from 0 and
    the data ending exactly at the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            first = f.read(8)
            n = int.from_bytes(first, "little") if len(first) == 8 else 0
            if len(first) < 8:
                raise ShardError(f"{path}: file is truncated ({size} bytes, no safetensors header)")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ShardError(f"{path}: header length {n} is out of range (file is {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ShardError(f"{path}: header is not UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ShardError(f"{path}: header is not a JSON object")
    meta_block = header.pop("__metadata__", None)
    if meta_block is not None and not isinstance(meta_block, dict):
        raise ShardError(f"{path}: header's __metadata__ is not an object")
    entries = []
    for name, meta in header.items():
        if not isinstance(meta, dict):
            raise ShardError(f"{path}: tensor '{name}' has a malformed header entry (not an object)")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ShardError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ShardError(f"{path}: tensor '{name}' has a malformed shape {shape!r} (a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise ShardError(f"{path}: tensor '{name}' has malformed data_offsets {offsets!r} (two non-negative integers)")
        begin, end = offsets
        shape = tuple(shape)
        count = 1
        for d in shape:
            count *= d
        expected = count * DTYPES[dtype][1]
        if end - begin != expected:
            raise ShardError(
                f"{path}: tensor '{name}' holds {end - begin} bytes but {dtype}{list(shape)} needs {expected}"
            )
        entries.append((begin, end, name, dtype, shape))
    entries.sort()
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            raise ShardError(f"{path}: tensor '{name}' starts at {begin}, expected {pos} (offsets not contiguous)")
        pos = end
    if 8 + n + pos != size:
        raise ShardError(
            f"{path}: file is {size} bytes but its header describes {8 + n + pos} (truncated or padded shard)"
        )
    return [
        TensorInfo(name, path, 8 + n + begin, end - begin, dtype, shape)
        for begin, end, name, dtype, shape in entries
    ]


# --- reading ---------------------------------------------------------------------------

_ALIGN = 4096


def open_for_reading(path: Path, direct: bool) -> tuple[int, bool]:
    """Open a shard for pread; with `direct`, try to bypass the page cache.

    Returns (fd, direct_active). O_DIRECT (Linux) needs aligned reads and is refused by
    some file systems (tmpfs); F_NOCACHE (macOS) is a hint. Either way we fall back to a
    plain descriptor and say so, rather than report direct I/O that is not happening.
    """
    if direct and sys.platform.startswith("linux") and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass
    fd = os.open(path, os.O_RDONLY)
    if direct and sys.platform == "darwin":
        try:
            import fcntl

            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
            return fd, True
        except OSError:
            pass
    return fd, False


def default_read_threads() -> int:
    """Reads in flight for one batch: an SSD needs several (Apple's reach 5-7 GB/s only with
    a queue), and copies from the page cache scale with cores; capped where it stops paying.
    `CHRONOS_READ_THREADS` overrides it (1: the calling thread reads every batch alone)."""
    env = os.environ.get("CHRONOS_READ_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"CHRONOS_READ_THREADS={env!r}: expected a whole number of threads") from None
    return max(1, min(8, os.cpu_count() or 1))


def default_min_bytes_per_thread() -> int:
    """Bytes a reader thread must have before a batch is split: a hand-off cost ~100 us on
    a 2-core machine whose cores also compute; with 8 or more cores idle ones take it at
    once, and a single expert's tensors (2.65 MB in Qwen3-30B-A3B) should spread."""
    return (512 << 10) if (os.cpu_count() or 1) >= 8 else (1 << 20)


def split_read_path() -> str:
    """How a batch split for parallel reads is read on this machine, in words."""
    n = default_read_threads()
    if n <= 1:
        return "one thread (CHRONOS_READ_THREADS=1)"
    if lio.available():
        return f"one lio_listio call, up to {n} descriptors in flight (Linux glibc)"
    return f"up to {n} Python reader threads"


class ShardReader:
    """Reads byte ranges of shards into caller buffers. Thread-safe: pread has no file position."""

    def __init__(self, index: ShardIndex, direct: bool = False):
        self.index = index
        self._fds: dict[Path, int] = {}
        self._dups: dict[Path, list] = {}  # more descriptors of a shard, for lio_listio (lio.py)
        self._direct: dict[Path, bool] = {}
        self._want_direct = direct
        self._mmaps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._bounce = threading.local()
        self.bytes_read = 0
        self.read_calls = 0
        self.simulator = None  # a SimulatedSSD (io.py) that delays each read, or None
        # Parallel reads of one batch: up to `threads` in flight once a batch has at least
        # `min_bytes_per_thread` per thread (smaller batches are read by the caller alone).
        self.threads = default_read_threads()
        self.min_bytes_per_thread = default_min_bytes_per_thread()
        self.lio = True  # split batches go to one lio_listio call where it runs; False: Python threads
        self._executor = None

    @property
    def direct_io_active(self) -> bool:
        return bool(self._direct) and all(self._direct.values())

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd, active = open_for_reading(path, self._want_direct)
                    except OSError as e:
                        raise ShardError(f"{path}: cannot open shard ({e.strerror or e})") from None
                    self._direct[path] = active
                    self._fds[path] = fd
        return fd

    def check(self, path: Path):
        """Re-check a shard's size before a batch of reads from it."""
        self.index.check_unchanged(path)

    def read_into(self, path: Path, offset: int, out, checked: bool = False) -> None:
        """Fill the writable buffer `out` (numpy array or memoryview) from `path` at `offset`."""
        done = self.read_batch([(path, offset, out)], checked=checked)[0]
        wait_until(done)

    def read_batch(self, requests, checked: bool = False) -> list[float]:
        """Read several ranges [(path, offset, out)] as one submission (see `read_runs`);
        ranges that touch on disk become one read. Returns, per request, the
        `time.perf_counter()` from which its bytes count as arrived."""
        runs = _merge_runs(requests)
        done = [0.0] * len(requests)
        for run, t in zip(runs, self.read_runs(runs, checked=checked)):
            for i in run.ids:
                done[i] = t
        return done

    def read_runs(self, runs: list, checked: bool = False) -> list[float]:
        """Read `runs` (each a contiguous file range scattered into its buffers) as one
        submission.

        The kernel is told about every range first (`advise_willneed`), so a drive has
        them all in flight together instead of one latency after another; each run is one
        vectored `preadv`. Returns, per run, the `time.perf_counter()` from which its
        bytes count as arrived: now, or later under a SimulatedSSD (callers `wait_until`)."""
        started = time.perf_counter()
        if not checked:
            for path in {r.path for r in runs}:
                self.index.check_unchanged(path)
        fds = [self._fd(r.path) for r in runs]
        if len(runs) > 1:
            for r, fd in zip(runs, fds):
                if not self._direct[r.path]:
                    advise_willneed(fd, r.offset, r.nbytes)
        groups = self._split(runs, fds)
        if len(groups) > 1 and self._lio_ok(runs):
            self._read_lio(groups)  # all groups in flight from one call: no Python hand-offs
        elif len(groups) > 1:
            # Several reads in flight: a drive (and a page-cache copy) only reaches its rate
            # that way. pread releases the GIL; this thread takes the first group itself.
            futures = [self._pool().submit(self._read_group, g) for g in groups[1:]]
            try:
                self._read_group(groups[0])
            finally:
                errors = [f.exception() for f in futures]
            if any(errors):
                raise next(e for e in errors if e)
        else:
            self._read_group(groups[0] if groups else [])
        if self.simulator is not None:
            done = self.simulator.schedule([r.nbytes for r in runs], started)
        else:
            done = [started] * len(runs)
        with self._lock:
            self.bytes_read += sum(r.nbytes for r in runs)
            self.read_calls += len(runs)
        return done

    def plain_reads(self, nbytes: int, paths) -> bool:
        """Whether a batch of `nbytes` from `paths` is best read by the calling thread
        alone with one pread per range (`pread`): no O_DIRECT bounce, and too small to
        split across threads (see `_split`)."""
        if not hasattr(os, "preadv") or nbytes >= 2 * self.min_bytes_per_thread and self.threads > 1:
            return False
        for path in paths:
            if self._direct.get(path, self._want_direct):
                return False
        return True

    def pread(self, path: Path, offset: int, out) -> None:
        """Fill the writable buffer `out` from `path` at `offset` (no checks: see `check`)."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fd(path)
        try:
            n = os.preadv(fd, [out], offset)
            if n < out.nbytes:  # a short read (rare): finish it
                _preadv_full(fd, offset + n, _skip([memoryview(out).cast("B")], n), path)
        except OSError as e:
            raise ShardError(f"{path}: read failed at offset {offset} ({e.strerror or e})") from None

    def pread_views(self, path: Path, offset: int, views: list) -> None:
        """Fill consecutive buffers from one contiguous range of `path` (one vectored read)."""
        try:
            _preadv_full(self._fds.get(path) or self._fd(path), offset, views, path)
        except OSError as e:
            raise ShardError(f"{path}: read failed at offset {offset} ({e.strerror or e})") from None

    def account(self, sizes: list, calls: int, started: float) -> list[float]:
        """Count reads made with `pread` since `started`; returns when each of `sizes` counts
        as arrived (now, or later under a SimulatedSSD)."""
        with self._lock:
            self.bytes_read += sum(sizes)
            self.read_calls += calls
        if self.simulator is not None:
            return self.simulator.schedule(sizes, started)
        return [started] * len(sizes)

    def _read_group(self, group: list):
        for r, fd in group:
            try:
                if self._direct[r.path] and sys.platform.startswith("linux"):
                    self._read_direct(fd, r.offset, r.views)
                elif hasattr(os, "preadv"):
                    _preadv_full(fd, r.offset, r.views, r.path)
                else:  # no preadv (e.g. Windows): slice an mmap of the shard
                    mm = self._mmap(r.path)
                    pos = r.offset
                    for v in r.views:
                        v[:] = mm[pos : pos + len(v)]
                        pos += len(v)
            except OSError as e:
                raise ShardError(f"{r.path}: read failed at offset {r.offset} ({e.strerror or e})") from None

    def _lio_ok(self, runs: list) -> bool:
        """Whether a split batch goes to `lio_listio` (buffered reads, where it is available)."""
        return self.lio and lio.available() and not any(self._direct.get(r.path, False) for r in runs)

    def _dup_fds(self, path: Path, n: int) -> list:
        """`n` descriptors of `path`: glibc runs one descriptor's requests one after another."""
        fds = self._dups.get(path)
        if fds is None or len(fds) < n:
            with self._lock:
                fds = self._dups.setdefault(path, [])
                while len(fds) < n:
                    fds.append(os.dup(self._fds[path]))
        return fds

    def _read_lio(self, groups: list):
        """Read every group's runs in one `lio_listio` call, group g through descriptor g: the
        groups run in parallel, each group's pieces in order."""
        pieces, paths = [], []
        for g, group in enumerate(groups):
            for r, _ in group:
                fd, pos = self._dup_fds(r.path, len(groups))[g], r.offset
                for v in r.views:
                    pieces.append((fd, pos, v))
                    paths.append(r.path)
                    pos += len(v)
        try:
            got = lio.read_pieces(pieces)
            for (fd, pos, v), n, path in zip(pieces, got, paths):
                if n < len(v):  # short (the end of the file): finish it, or a clear error
                    _preadv_full(fd, pos + n, [v[n:]], path)
        except OSError as e:
            where = paths[0] if len(set(paths)) == 1 else sorted({str(p) for p in paths})
            raise ShardError(f"{where}: read failed ({e.strerror or e})") from None

    def _split(self, runs: list, fds: list) -> list:
        """The runs in up to `threads` groups of similar byte counts; one group when the
        batch is too small for a hand-off to pay (measured: ~100 us per hand-off)."""
        total = sum(r.nbytes for r in runs)
        chunk = self.min_bytes_per_thread
        if self.threads > 1 and total >= 2 * chunk:
            cut = max(chunk, 64 << 10)  # never pieces so small that the calls dominate
            # A run larger than two threads' share is cut so that several threads read it
            # (one expert's big tensors would otherwise cap the batch at three threads).
            pieces = []
            for r, fd in zip(runs, fds):
                if r.nbytes >= 2 * cut and not self._direct.get(r.path, False):
                    pieces += [(c, fd) for c in _chunks(r, cut)]
                else:
                    pieces.append((r, fd))
            runs, fds = [r for r, _ in pieces], [fd for _, fd in pieces]
        n = min(self.threads, len(runs), max(1, total // chunk))
        if n <= 1:
            return [list(zip(runs, fds))]
        groups, sizes = [[] for _ in range(n)], [0] * n
        for r, fd in sorted(zip(runs, fds), key=lambda rf: -rf[0].nbytes):
            i = sizes.index(min(sizes))  # largest first into the emptiest group
            groups[i].append((r, fd))
            sizes[i] += r.nbytes
        return groups

    def _pool(self):
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._executor = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="chronos-read")
        return self._executor

    def _read_direct(self, fd: int, offset: int, views: list):
        # O_DIRECT wants offset, length and buffer aligned: read the aligned superset.
        total = sum(len(v) for v in views)
        start = offset - offset % _ALIGN
        end = -(-(offset + total) // _ALIGN) * _ALIGN
        buf = getattr(self._bounce, "buf", None)
        if buf is None or len(buf) < end - start:
            buf = mmap.mmap(-1, max(end - start, 1 << 20))  # page aligned
            self._bounce.buf = buf
        mv = memoryview(buf)[: end - start]
        got = 0
        while got < len(mv):
            n = os.preadv(fd, [mv[got:]], start + got)
            if n <= 0:
                break
            got += n
        if got < offset - start + total:
            raise ShardError(f"read past end of shard at offset {offset}")
        pos = offset - start
        for v in views:
            v[:] = mv[pos : pos + len(v)]
            pos += len(v)

    def _mmap(self, path: Path) -> mmap.mmap:
        with self._lock:
            if path not in self._mmaps:
                with open(path, "rb") as f:
                    self._mmaps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._mmaps[path]

    def close(self):
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            for fds in self._dups.values():
                for fd in fds:
                    os.close(fd)
            self._dups.clear()
            for mm in self._mmaps.values():
                mm.close()
            self._mmaps.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@dataclass
class ReadRun:
    """A contiguous range of one file, read with one call into consecutive buffers."""

    path: Path
    offset: int
    views: list  # byte memoryviews, filled in order
    nbytes: int
    ids: list = field(default_factory=list)  # which requests (read_batch) they serve


def _merge_runs(requests) -> list[ReadRun]:
    order = sorted(range(len(requests)), key=lambda i: (str(requests[i][0]), requests[i][1]))
    runs: list[ReadRun] = []
    for i in order:
        path, offset, out = requests[i]
        view = memoryview(out).cast("B")
        last = runs[-1] if runs else None
        if last is not None and last.path == path and last.offset + last.nbytes == offset and len(last.views) < _IOV_MAX:
            last.views.append(view)
            last.ids.append(i)
            last.nbytes += len(view)
        else:
            runs.append(ReadRun(path, offset, [view], len(view), [i]))
    return runs


_IOV_MAX = 512  # buffers per preadv: well under every platform's IOV_MAX (1024)


def advise_willneed(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start reading a range now (readahead), so that the reads of a
    batch are in flight together. posix_fadvise on Linux, F_RDADVISE on macOS; elsewhere
    nothing, and the reads simply happen one after another."""
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        elif sys.platform == "darwin":
            import fcntl

            # struct radvisory { off_t ra_offset; int ra_count; }
            fcntl.fcntl(fd, getattr(fcntl, "F_RDADVISE", 44), struct.pack("qi4x", offset, min(nbytes, 2**31 - 1)))
    except OSError:
        pass


def wait_until(t: float) -> None:
    """Sleep until `time.perf_counter()` reaches `t` (a read's simulated arrival)."""
    remaining = t - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


def _preadv_full(fd: int, offset: int, views: list, path: Path):
    got, total = 0, sum(len(v) for v in views)
    while got < total:
        n = os.preadv(fd, _skip(views, got) if got else views, offset + got)
        if n <= 0:
            raise ShardError(f"{path}: read past end of file at offset {offset + got}")
        got += n


def _chunks(run: ReadRun, size: int) -> list:
    """`run` cut into consecutive ReadRuns of about `size` bytes (its buffers sliced where a
    cut falls inside one)."""
    out, views, got, start = [], [], 0, run.offset
    for v in run.views:
        while len(v):
            take = min(len(v), size - got)
            views.append(v[:take])
            v = v[take:]
            got += take
            if got == size:
                out.append(ReadRun(run.path, start, views, got))
                start += got
                views, got = [], 0
    if got:
        out.append(ReadRun(run.path, start, views, got))
    return out


def _skip(views: list, n: int) -> list:
    """The buffers left after the first `n` bytes were filled (a short preadv)."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out
