"""`chronos doctor`: what a model needs, what this machine has, and what to expect, before
any weight is read.

Model facts come from `loader.plan_model` (config, shard headers and a lazily built model:
no tensor data is read). The machine's memory comes from `chronos_mlx.memory`; its read
bandwidth from a short timed read of one shard (with that range dropped from the page cache
first where the OS allows, so the figure is the drive's, not RAM's); its memory bandwidth from
a timed copy. The recommendation is `--expert-budget auto`'s choice.

Expected decode speed, from the I/O model: a token needs `top_k` experts in each MoE layer;
at hit rate h it reads (1 - h) * top_k * layers * bytes_per_expert_on_disk, so

    tokens/s <= min(resident speed, read bandwidth / bytes read per token)

with the resident speed bounded by memory bandwidth / bytes touched per token (dense weights +
the active experts). The hit rate at a budget is either measured (`measure=True`: generate a
few tokens once, record every layer's routing, replay it through an LRU cache of each size;
this reads weights) or assumed to equal the fraction of experts resident (routing without
locality: the pessimistic end; real workloads reuse experts and do better).
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from .budget import DEFAULT_CONTEXT_TOKENS, auto_budget, kv_bytes_per_token, parse_memory
from .errors import BudgetError

CURVE_FRACTIONS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)
SCHEMA_VERSION = 1


def measure_read_bandwidth(model_path, nbytes: int = 64 * 1024**2, chunk: int = 4 * 1024**2) -> Optional[dict]:
    """Time reading up to `nbytes` from the middle of the largest shard of `model_path`."""
    shards = sorted(Path(model_path).glob("*.safetensors"), key=lambda p: p.stat().st_size, reverse=True)
    if not shards:
        return None
    path = shards[0]
    size = path.stat().st_size
    n = min(nbytes, size)
    offset = ((size - n) // 2) // 4096 * 4096
    fd = os.open(path, os.O_RDONLY)
    try:
        uncached = False
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
                uncached = True
            elif sys.platform == "darwin":
                import fcntl

                fcntl.fcntl(fd, 48, 1)  # F_NOCACHE
                uncached = True
        except OSError:
            pass
        buf = bytearray(chunk)
        view = memoryview(buf)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            got = os.preadv(fd, [view[: min(chunk, n - done)]], offset + done) if hasattr(os, "preadv") else len(
                os.pread(fd, min(chunk, n - done), offset + done)
            )
            if got <= 0:
                break
            done += got
        dt = max(time.perf_counter() - t0, 1e-9)
    finally:
        os.close(fd)
    return {
        "file": path.name,
        "bytes": done,
        "seconds": dt,
        "bytes_per_s": done / dt,
        "page_cache_dropped": uncached,
        "note": (
            "the range was dropped from the page cache first: a cold read"
            if uncached
            else "may have come from the page cache (could not drop it): an upper bound"
        ),
    }


def measure_memory_bandwidth(nbytes: int = 64 * 1024**2, repeats: int = 3) -> float:
    """Bytes per second of a large memory copy (read + write), best of `repeats`."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / max(best, 1e-9)


def lru_hit_rate(steps_by_layer: list, slots: int) -> float:
    """Steady-state hit rate of an LRU cache of `slots` experts per layer replaying recorded
    routing: steps_by_layer[layer] = [(warm, expert ids of one step), ...]. Warm steps (a
    prompt's prefill) fill the cache without being counted, and neither are first uses while
    the cache still has free slots (at budget 1.0 chronos pre-loads every expert; below, such
    compulsory misses happen once per slot, not per token)."""
    hits = total = 0
    for steps in steps_by_layer:
        cache: OrderedDict = OrderedDict()
        for warm, used in steps:
            uniq = np.unique(used).tolist()
            present = [e for e in uniq if e in cache]
            for e in present:  # a step's experts are used together: touch them all first
                cache.move_to_end(e)
            if not warm:
                hits += len(present)
                total += len(present)
            for e in uniq:
                if e in cache:
                    continue
                if not warm and len(cache) >= slots:
                    total += 1
                cache[e] = True
                if len(cache) > slots:
                    cache.popitem(last=False)
    return hits / total if total else 1.0


class _RoutingRecorder:
    def __init__(self, layers: int):
        self.steps = [[] for _ in range(layers)]

    def observe(self, layer, experts):
        self.steps[layer].append(np.asarray(experts).reshape(-1))


def measure_routing(model_spec, prompts: list, *, max_tokens: int = 32, dtype=None, budget="1.0") -> list:
    """Routing of a short generation per prompt (this reads weights): per layer, a list of
    (warm, expert ids) where the prompt's prefill is warm and each decode step is not."""
    from . import load
    from .generate import stream_generate

    model, tokenizer, runtime = load(model_spec, budget, dtype=dtype)
    rec = _RoutingRecorder(len(runtime.cache.layers))
    runtime.observers.append(rec)
    steps = [[] for _ in runtime.cache.layers]
    for prompt in prompts:
        rec.steps = [[] for _ in runtime.cache.layers]
        for _ in stream_generate(model, tokenizer, prompt, runtime, max_tokens=max_tokens, sync="per-layer"):
            pass
        for layer, s in enumerate(rec.steps):
            steps[layer].extend((i == 0, ids) for i, ids in enumerate(s))  # the first is the prefill
    runtime.observers.remove(rec)
    return steps


def _device_fetch_fit(path, modes) -> dict | None:
    """Whether `--sync device-fetch` could hold this model's shards page-locked here (CUDA only:
    None elsewhere), and a line that says so."""
    if "device-fetch" not in modes:
        return None
    from pathlib import Path

    from .device_fetch import MAX_HOST_SHARE, host_memory_bytes

    shards = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    host = host_memory_bytes() or 0
    fits = bool(host) and shards <= MAX_HOST_SHARE * host
    gib = f"{shards / 2**30:.1f} GiB of shards, {host / 2**30:.1f} GiB of host memory"
    line = (f"--sync device-fetch fits ({gib}): the fastest mode under misses on a GPU, holding every shard "
            "page-locked in host memory; auto does not pick it" if fits else
            f"--sync device-fetch does not fit ({gib}); device-wait it is")
    return {"fits": fits, "shard_bytes": shards, "host_bytes": host, "line": line}


def _is_repo_id(spec) -> bool:
    import re

    return bool(spec) and not Path(str(spec)).expanduser().exists() and bool(
        re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec))
    ) and not str(spec).startswith((".", "/"))


def header_only_checkpoint(repo_id: str, dest) -> Path:
    """A directory `plan_model` can read for a Hugging Face repo whose weights are not here:
    config.json and the index are downloaded; each shard is a sparse stand-in holding the
    real safetensors header (fetched with HTTP range requests) and no data. Nothing of the
    weights is transferred."""
    import json
    import shutil

    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(hf_hub_download(repo_id, "config.json"), dest / "config.json")
    try:
        shutil.copy(hf_hub_download(repo_id, "model.safetensors.index.json"), dest / "model.safetensors.index.json")
    except Exception:  # a single-file checkpoint has no index
        pass
    meta = get_safetensors_metadata(repo_id)
    for fname, fm in meta.files_metadata.items():
        header = {"__metadata__": dict(fm.metadata or {})} if fm.metadata else {}
        end = 0
        for name, t in fm.tensors.items():
            header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
            end = max(end, int(t.data_offsets[1]))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(dest / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            f.truncate(8 + len(raw) + end)  # sparse: no data blocks
    return dest


def measure_drive_bandwidth(directory, nbytes: int = 64 * 1024**2) -> Optional[dict]:
    """Read bandwidth of the drive holding `directory`: write a scratch file, drop it from
    the page cache, time reading it back (for a model whose shards are not here yet)."""
    import tempfile

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "scratch.safetensors"
        block = os.urandom(1024**2)
        with open(path, "wb") as f:
            for _ in range(nbytes // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        result = measure_read_bandwidth(tmp, nbytes)
    if result:
        result["file"] = f"a {nbytes // 1024**2} MiB scratch file in {directory}"
    return result


DEFAULT_PROMPTS = ["The history of the Roman Empire begins", "def fibonacci(n):", "Once upon a time"]


def diagnose(
    model=None,
    *,
    dtype=None,
    memory_limit=None,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    read_bytes: int = 64 * 1024**2,
    measure: bool = False,
    measure_tokens: int = 32,
) -> dict:
    """The doctor's report as a dict (the `--json` schema)."""
    import tempfile

    import mlx.core as mx

    from .loader import compute_dtype, plan_model
    from .memory import machine_memory
    from .generate import available_sync_modes, resolve_sync
    from .shards import split_read_path
    from .upload import expert_write_path

    remote = None
    if _is_repo_id(model):
        try:  # already downloaded: use it as is
            from huggingface_hub import snapshot_download

            model = snapshot_download(str(model), local_files_only=True)
        except Exception:
            remote = str(model)
    if remote:
        scratch = tempfile.TemporaryDirectory(prefix="chronos-doctor-")
        try:
            plan = plan_model(header_only_checkpoint(remote, scratch.name), dtype)
        except Exception as e:
            from .errors import ModelError

            if isinstance(e, ModelError):
                raise
            raise ModelError(
                f"cannot read the config and shard headers of '{remote}' from Hugging Face ({type(e).__name__}: {e})"
            ) from None
        finally:
            scratch.cleanup()
        measure = False  # nothing to generate with: the weights are not here
    else:
        plan = plan_model(model, dtype)
    info, config = plan.info, plan.config
    target = compute_dtype(dtype)
    kv_dtype = target.size if target is not None else 2
    has_experts = bool(info.get("num_experts"))
    layers = int(info.get("moe_layers") or 0)
    top_k = int(info.get("top_k") or 0)
    per = int(info.get("bytes_per_expert") or 0)
    per_disk = int(info.get("bytes_per_expert_on_disk") or 0)
    dense = int(info.get("dense_bytes") or 0)
    experts_total = int(info.get("expert_bytes_total") or 0)
    kv_1k = kv_bytes_per_token(config, kv_dtype) * 1000
    needs = {
        "dense_bytes": dense,
        "expert_bytes_total": experts_total,
        "bytes_per_expert": per,
        "bytes_per_expert_on_disk": per_disk,
        "kv_bytes_per_1k_tokens": kv_1k,
        "active_expert_bytes_per_token": top_k * layers * per,
        "resident_total_bytes": dense + experts_total + kv_1k * context_tokens // 1000,
        "context_tokens": context_tokens,
    }
    mem = machine_memory()
    limit = parse_memory(memory_limit) if isinstance(memory_limit, str) else memory_limit
    if remote:
        from huggingface_hub.constants import HF_HUB_CACHE

        read = measure_drive_bandwidth(HF_HUB_CACHE, read_bytes)
    else:
        read = measure_read_bandwidth(plan.path, read_bytes)
    mem_bw = measure_memory_bandwidth()
    machine = {
        "total_bytes": mem.total_bytes,
        "available_bytes": mem.available_bytes,
        "available_source": mem.source,
        "recommended_working_set_bytes": mem.recommended_working_set_bytes,
        "memory_limit_bytes": limit,
        "memory_bandwidth_bytes_per_s": mem_bw,
        "read": read,
        "platform": sys.platform,
        "expert_writes": expert_write_path(),
        "sync_modes": available_sync_modes(),
        "default_sync": resolve_sync("auto"),
        # How per-layer routing waits for a layer's routing (Runtime.late_rows).
        "per_layer": "late rows" if mx.default_device() == mx.cpu else "gates",
        "split_reads": split_read_path(),
        "device_fetch": None if remote else _device_fetch_fit(plan.path, available_sync_modes()),
    }
    rec: dict = {"fits": True, "error": None}
    try:
        choice = auto_budget(
            info, config, memory_bytes=limit if limit else mem.available_bytes,
            memory_source="--memory-limit" if limit else mem.source, context_tokens=context_tokens, kv_dtype_bytes=kv_dtype,
        )
        rec.update(
            budget=choice.budget, fraction=choice.fraction, slots_per_layer=choice.slots_per_layer,
            expert_budget_bytes=choice.expert_bytes, all_experts_resident=choice.fits, line=choice.line(),
            headroom_bytes=choice.headroom_bytes, overhead_bytes=choice.overhead_bytes,
        )
    except BudgetError as e:
        rec.update(fits=False, error=str(e), budget=None, fraction=0.0, all_experts_resident=False)

    # Speed model
    touched = dense + top_k * layers * per
    resident_bound = mem_bw / touched if touched else None
    read_bw = read["bytes_per_s"] if read else None
    steps = None
    if measure and has_experts and rec["fits"]:
        steps = measure_routing(model, DEFAULT_PROMPTS, max_tokens=measure_tokens, dtype=dtype, budget=rec["budget"])
    fractions = sorted(set(CURVE_FRACTIONS) | ({rec["fraction"]} if rec.get("fraction") else set()), reverse=True)
    curve = []
    for f in fractions if has_experts else ():
        slots = max(int(f * info["num_experts"] + 1e-9), 0)
        if slots < top_k:
            continue
        h = lru_hit_rate(steps, slots) if steps else f
        per_token = (1 - h) * top_k * layers * per_disk
        io_bound = read_bw / per_token if (read_bw and per_token > 0) else None
        bound = min(x for x in (resident_bound, io_bound) if x is not None) if (resident_bound or io_bound) else None
        curve.append({
            "fraction": f,
            "slots_per_layer": slots,
            "hit_rate": h,
            "hit_rate_source": "measured (steady-state LRU replay of recorded routing)" if steps else "assumed = fraction resident",
            "bytes_read_per_token": per_token,
            "io_tokens_per_s_bound": io_bound,
            "tokens_per_s_bound": bound,
        })
    def bound_at(h):
        per_token = (1 - h) * top_k * layers * per_disk
        io = read_bw / per_token if (read_bw and per_token > 0) else None
        vals = [x for x in (resident_bound, io) if x is not None]
        return min(vals) if vals else None

    expected = None
    if has_experts and rec.get("fraction"):
        f = rec["fraction"]
        point = next((p for p in curve if abs(p["fraction"] - f) < 1e-12), None)
        # low end: no locality (hit rate = fraction resident); high end: the measured hit rate,
        # or, unmeasured, every needed expert resident.
        expected = [bound_at(f), point["tokens_per_s_bound"] if (point and steps) else bound_at(1.0)]
    elif not has_experts:
        expected = [resident_bound, resident_bound]
    speed = {
        "resident_tokens_per_s_bound": resident_bound,
        "resident_bound_note": "memory bandwidth / (dense + active expert bytes); compute can make it slower",
        "read_bandwidth_bytes_per_s": read_bw,
        "expected_tokens_per_s": expected,
        "hit_rate_measured": bool(steps),
        "assumption": (
            "hit rates measured by replaying the routing of a short generation through LRU caches; the range's lower end assumes no locality (hit rate = fraction resident)"
            if steps
            else "hit rate assumed = fraction of experts resident (no locality; pessimistic); the range's upper end assumes every needed expert is resident"
        ),
        "curve": curve,
    }
    fails = None
    if not rec["fits"]:
        fails = (
            f"loading fails with a budget error: {rec['error']}"
        )
    elif limit is None and dense + kv_1k * context_tokens // 1000 > mem.available_bytes:
        fails = "the dense weights and KV cache alone exceed the available memory: expect swapping"
    return {
        "schema_version": SCHEMA_VERSION,
        "weights_read": bool(steps),
        "model": {
            "path": remote or info.get("path"),
            "local": remote is None,
            "model_type": info.get("model_type"),
            "num_hidden_layers": info.get("num_hidden_layers"),
            "moe_layers": layers,
            "num_experts": info.get("num_experts"),
            "top_k": top_k,
            "dtype": info.get("dtype"),
            "quantization": _quant(info.get("quantization")),
        },
        "needs": needs,
        "machine": machine,
        "recommendation": rec,
        "speed": speed,
        "fails": fails,
    }


def _quant(q):
    if not q:
        return None
    return {k: v for k, v in q.items() if not isinstance(v, dict)}
