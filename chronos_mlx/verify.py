"""Integrity of a model's shards: sha256 of every shard, and of every expert's bytes.

`verify_model(dir)` hashes each shard (one sequential read) and checks it against

- the Hugging Face cache, when the shard is a snapshot symlink into `blobs/`: a large
  (LFS) file's blob is named by its sha256, so the expected hash is the file name;
- the model's manifest, written by the first verification (`manifest_path`): later runs
  check against it. It is written once and never replaced unless asked (`update=True`),
  and never over a file that is not a chronos manifest.

The same read pass hashes each expert's byte range of each expert parameter; those hashes
go into the manifest, and `ExpertVerifier` (`--verify-experts`) checks each expert's bytes
against them the first time the cache reads that expert: flipped bits or a relabelled
dtype become an error instead of wrong tokens.

Library code: nothing here prints; progress goes to a callback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ChronosError, ShardError

MANIFEST_FORMAT = "chronos-mlx-manifest"
MANIFEST_VERSION = 1
EXPERT_HASH_CHARS = 32  # 128 bits of sha256 per expert range: ample for integrity
_CHUNK = 8 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class VerifyError(ChronosError):
    """A manifest is unreadable, or not ours, or an expert's bytes do not match it."""


def manifest_dir() -> Path:
    env = os.environ.get("CHRONOS_MANIFEST_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chronos-mlx" / "manifests"


def manifest_path(model_dir) -> Path:
    """Where the manifest of the model in `model_dir` lives (outside the model directory,
    which may be read-only or a Hugging Face snapshot): one file per resolved directory."""
    root = Path(model_dir).expanduser().resolve()
    tag = hashlib.sha256(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", root.name)[:80] or "model"
    return manifest_dir() / f"{safe}-{tag}.json"


def hf_expected_sha256(path: Path) -> str | None:
    """The sha256 the Hugging Face cache records for a snapshot file, if it is an LFS blob."""
    try:
        if not path.is_symlink():
            return None
        target = path.resolve()
    except OSError:
        return None
    if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
        return target.name
    return None


# --------------------------------------------------------------------------------------
# Manifest files
# --------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict | None:
    """The manifest at `path`, or None when there is none. A file there that is not a
    chronos manifest (or is corrupt) is an error, never silently replaced."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise VerifyError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise VerifyError(f"{path}: exists but is not a chronos-mlx manifest; not touching it (move it away)")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MANIFEST_VERSION:
        raise VerifyError(f"{path}: manifest version {version!r} is not one this chronos-mlx reads")
    shards, experts = data.get("shards"), data.get("experts")
    if not isinstance(shards, dict) or not isinstance(experts, dict):
        raise VerifyError(f"{path}: malformed manifest (shards/experts); delete it or pass --update")
    for name, s in shards.items():
        if not (isinstance(s, dict) and isinstance(s.get("sha256"), str) and _HEX64.fullmatch(s["sha256"])
                and isinstance(s.get("size"), int)):
            raise VerifyError(f"{path}: malformed manifest entry for shard '{name}'")
    for name, rows in experts.items():
        if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[0], int) and isinstance(r[1], int)
            and isinstance(r[2], str) for r in rows
        ):
            raise VerifyError(f"{path}: malformed expert hashes for shard '{name}'")
    return data


def write_manifest(path: Path, data: dict):
    from .profiles import atomic_write_text

    if path.exists():
        read_manifest(path)  # refuses anything that is not ours
    atomic_write_text(path, json.dumps(data, separators=(",", ":")) + "\n")


# --------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------


def expert_tag(tensor) -> bytes:
    """What an expert hash covers besides the bytes: the dtype and per-expert shape the
    header gives them (so relabelling BF16 as F16 is caught too)."""
    return f"{tensor.dtype}{list(tensor.shape)}".encode()


def expert_ranges(model_dir) -> dict[str, list[tuple[int, int, bytes]]]:
    """Per shard file name, the sorted (offset, nbytes, tag) of every expert of every expert
    parameter (from the lazily built model: nothing is read but headers)."""
    from .loader import plan_model

    plan = plan_model(model_dir)
    ranges: dict[str, set] = {}
    for layer in plan.layers:
        for tensor, _ in layer.values():
            for sl in tensor.slices:
                ranges.setdefault(sl.path.name, set()).add((sl.offset, sl.nbytes, expert_tag(tensor)))
    return {name: sorted(r) for name, r in ranges.items()}


def hash_file(path: Path, ranges=(), on_bytes=None, stop=None) -> tuple[str, list]:
    """sha256 of the file, and of each (offset, nbytes, tag) range in `ranges` (sorted, not
    overlapping; the hash covers tag + bytes), in one sequential read. `on_bytes(n)` after each chunk; `stop()` true
    aborts (KeyboardInterrupt is also safe: nothing is written here)."""
    whole = hashlib.sha256()
    out, i, cur, cur_end = [], 0, None, 0
    pos = 0
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror or e})") from None
    with f:
        buf = bytearray(_CHUNK)
        mv = memoryview(buf)
        while True:
            try:
                n = f.readinto(buf)
            except OSError as e:
                raise ShardError(f"{path}: read failed at offset {pos} ({e.strerror or e})") from None
            if not n:
                break
            chunk = mv[:n]
            whole.update(chunk)
            end = pos + n
            while True:
                if cur is None:
                    if i >= len(ranges) or ranges[i][0] >= end:
                        break
                    off, nb, tag = ranges[i]
                    cur, cur_end = hashlib.sha256(tag), off + nb
                    start = off
                else:
                    start = pos
                a, b = max(start, pos) - pos, min(cur_end, end) - pos
                if b > a:
                    cur.update(chunk[a:b])
                if cur_end <= end:
                    out.append([ranges[i][0], ranges[i][1], cur.hexdigest()[:EXPERT_HASH_CHARS]])
                    cur, i = None, i + 1
                else:
                    break
            pos = end
            if on_bytes:
                on_bytes(n)
            if stop is not None and stop():
                raise KeyboardInterrupt
    return whole.hexdigest(), out


@dataclass
class ShardResult:
    name: str
    size: int
    sha256: str
    expected: str | None  # None: nothing to check against (recorded now)
    source: str  # "huggingface", "manifest" or "recorded"

    @property
    def ok(self) -> bool:
        return self.expected is None or self.expected == self.sha256


@dataclass
class VerifyReport:
    model: Path
    manifest: Path
    shards: list = field(default_factory=list)
    manifest_written: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.shards)

    @property
    def bad(self) -> list:
        return [s for s in self.shards if not s.ok]

    def to_json(self) -> dict:
        return {
            "model": str(self.model),
            "manifest": str(self.manifest),
            "manifest_written": self.manifest_written,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "shards": [
                {"name": s.name, "size": s.size, "sha256": s.sha256, "expected": s.expected, "source": s.source, "ok": s.ok}
                for s in self.shards
            ],
        }


def shard_plan(model_dir) -> list[Path]:
    """The shards to hash (headers validated first: a broken header is reported as such)."""
    from .shards import ShardIndex

    return sorted(ShardIndex.open(model_dir).file_sizes)


def verify_model(model_dir, *, update: bool = False, on_start=None, on_bytes=None) -> VerifyReport:
    """Hash every shard of `model_dir` and check it (see the module doc). Writes the
    manifest when there is none (or `update`), but only when no shard failed a check.
    `on_start(total_bytes)` once, then `on_bytes(n)` as bytes are hashed."""
    from .loader import resolve_model_path

    t0 = time.perf_counter()
    root = resolve_model_path(model_dir)
    mpath = manifest_path(root)
    manifest = read_manifest(mpath)
    if update:
        manifest = None
    shards = shard_plan(root)
    try:
        ranges = expert_ranges(root)
    except ChronosError:
        ranges = {}  # not a model chronos streams (dense, unsupported): shard hashes only
    if on_start:
        on_start(sum(p.stat().st_size for p in shards))
    report = VerifyReport(root, mpath)
    expert_rows = {}
    for path in shards:
        sha, rows = hash_file(path, ranges.get(path.name, ()), on_bytes)
        expert_rows[path.name] = rows
        hf = hf_expected_sha256(path)
        if hf is not None:
            expected, source = hf, "huggingface"
        elif manifest is not None and path.name in manifest["shards"]:
            expected, source = manifest["shards"][path.name]["sha256"], "manifest"
        else:
            expected, source = None, "recorded"
        report.shards.append(ShardResult(path.name, path.stat().st_size, sha, expected, source))
    if manifest is None and report.ok:
        write_manifest(mpath, {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "model": str(root),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "shards": {s.name: {"size": s.size, "sha256": s.sha256} for s in report.shards},
            "experts": expert_rows,
        })
        report.manifest_written = True
    report.seconds = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------------------
# --verify-experts
# --------------------------------------------------------------------------------------


class ExpertVerifier:
    """Checks each expert's bytes against the manifest the first time the cache reads it.

    `check(layer, expert, parts)`: `parts` is [(path, offset, bytes-like, tag)] for each of
    the expert's parameters (tag: `expert_tag` of its tensor). Thread-safe; a mismatch is a ShardError naming the shard, the
    layer, the expert and the offset."""

    def __init__(self, manifest: dict, where: Path):
        self.where = where
        self.hashes = {
            (name, off): (nb, h) for name, rows in manifest["experts"].items() for off, nb, h in rows
        }
        self.verified: set = set()
        self.checked_bytes = 0
        self._lock = threading.Lock()

    def check(self, layer: int, expert: int, parts):
        key = (layer, expert)
        if key in self.verified:
            return
        n = 0
        for path, offset, data, tag in parts:
            entry = self.hashes.get((Path(path).name, offset))
            if entry is None or entry[0] != len(data):
                raise ShardError(
                    f"{path}: expert {expert} of MoE layer {layer} (offset {offset}) is not in the manifest "
                    f"{self.where}; the checkpoint's layout changed since it was written (run `chronos verify --update`)"
                )
            h = hashlib.sha256(tag)
            h.update(data)
            if h.hexdigest()[:EXPERT_HASH_CHARS] != entry[1]:
                raise ShardError(
                    f"{path}: expert {expert} of MoE layer {layer} (bytes {offset}..{offset + len(data)}) does not "
                    f"match its hash in {self.where}: the shard is corrupt; run `chronos verify` to check it"
                )
            n += len(data)
        with self._lock:
            self.verified.add(key)
            self.checked_bytes += n


def expert_verifier(model_dir, *, on_start=None, on_bytes=None) -> tuple[ExpertVerifier, VerifyReport | None]:
    """The verifier for `model_dir`; writes the manifest first (hashing every shard once)
    when there is none. Returns it and the report of that verification (None when the
    manifest existed). A shard that fails the Hugging Face check is an error."""
    from .loader import resolve_model_path

    root = resolve_model_path(model_dir)
    mpath = manifest_path(root)
    manifest = read_manifest(mpath)
    report = None
    if manifest is None:
        report = verify_model(root, on_start=on_start, on_bytes=on_bytes)
        if not report.ok:
            bad = ", ".join(s.name for s in report.bad)
            raise ShardError(f"{root}: shard(s) {bad} do not match their Hugging Face hash; not recording a manifest")
        manifest = read_manifest(mpath)
    return ExpertVerifier(manifest, mpath), report


def attach_verifier(runtime, verifier: ExpertVerifier):
    """Check experts from now on, and the ones already resident (read again from disk)."""
    cache = runtime.cache
    if cache is None:
        return
    cache.verifier = verifier
    fds = {}
    try:
        for layer, L in enumerate(cache.layers):
            for e in [int(x) for x in (L.slot_of >= 0).nonzero()[0]]:
                parts = []
                for p in L.params.values():
                    sl = p.source.slices[e]
                    if sl.path not in fds:
                        cache.reader.check(sl.path)
                        fds[sl.path] = os.open(sl.path, os.O_RDONLY)
                    parts.append((sl.path, sl.offset, os.pread(fds[sl.path], sl.nbytes, sl.offset), expert_tag(p.source)))
                verifier.check(layer, e, parts)
    finally:
        for fd in fds.values():
            os.close(fd)
