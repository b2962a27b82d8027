"""Co-activation layout: put experts that fire together next to each other on disk.

`expert_order` clusters one layer's experts by co-activation (networkx's Louvain community
detection, seeded) and orders them so each cluster is contiguous, hottest cluster first, and
inside a cluster each expert follows the one it fires with most. `pack` rewrites a checkpoint
with every layer's expert dimension permuted that way: the expert tensors and, consistently,
the router's output rows (weight, quantization scales/biases, router bias, DeepSeek's
e_score_correction_bias). Routing then picks the same experts under new numbers, so stock
mlx_lm gives the same output; `chronos-pack.json` records the permutations.

The output shards have exactly the input's headers (a permutation keeps every size), and are
written by streaming byte ranges: at most one expert's slice of one tensor (or an 8 MB block)
is in memory at a time.

`count_reads` measures what the layout buys: for a trace of expert loads, the number of read
calls (and bytes per call) when experts adjacent on disk are read with one call.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

from .errors import ModelError
from .files import check_can_create
from .profiles import atomic_write_text, check_fingerprint, fingerprint_of, load_profile, save_profile

PACK_FILE = "chronos-pack.json"
PACK_FORMAT = "chronos-mlx-pack"
PACK_VERSION = 1
_BLOCK = 8 * 1024 * 1024


# --------------------------------------------------------------------------------------
# Clustering and order
# --------------------------------------------------------------------------------------


def cluster_experts(coactivation: np.ndarray, seed: int = 0, resolution: float = 1.0) -> list[list[int]]:
    """Louvain communities of the co-activation graph (edge weight = tokens using both)."""
    import networkx as nx

    co = np.asarray(coactivation)
    n = co.shape[0]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    rows, cols = np.nonzero(np.triu(co, k=1))
    graph.add_weighted_edges_from((int(a), int(b), float(co[a, b])) for a, b in zip(rows, cols))
    communities = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    return [sorted(int(e) for e in c) for c in communities]


def _chain(members: list, co: np.ndarray, counts: np.ndarray) -> list:
    """Greedy path through a cluster: start at its most used expert, then always the
    remaining expert that fires most often with the last one placed."""
    left = sorted(members, key=lambda e: (-counts[e], e))
    order = [left.pop(0)]
    while left:
        best = max(left, key=lambda e: (co[order[-1], e], counts[e], -e))
        left.remove(best)
        order.append(best)
    return order


def expert_order(coactivation: np.ndarray, counts: np.ndarray, seed: int = 0, groups: int = 1):
    """One layer's layout: (perm, clusters). Position i on disk holds expert perm[i]; each
    cluster is a [start, end) range of positions.

    `groups` > 1 keeps experts inside their contiguous routing group (DeepSeek's
    group-limited routing selects groups by position, so experts may not leave theirs)."""
    co, counts = np.asarray(coactivation), np.asarray(counts)
    n = len(counts)
    if n % groups:
        raise ModelError(f"{n} experts do not split into {groups} routing groups")
    size = n // groups
    perm, clusters = [], []
    for g in range(groups):
        members = np.arange(g * size, (g + 1) * size)
        sub_co = co[np.ix_(members, members)]
        found = cluster_experts(sub_co, seed)
        found.sort(key=lambda c: (-counts[members[c]].sum(), c[0]))
        for c in found:
            clusters.append([len(perm), len(perm) + len(c)])
            perm.extend(members[_chain(c, sub_co, counts[members])].tolist())
    perm = np.asarray(perm, dtype=np.int64)
    assert sorted(perm.tolist()) == list(range(n))
    return perm, clusters


def routing_groups(config: dict) -> int:
    """How many contiguous expert groups the router selects among (1: none)."""
    cfg = {**config.get("text_config", {}), **config}
    n_group = cfg.get("n_group") or 1
    if cfg.get("topk_method") in ("greedy", None) and cfg.get("model_type") == "deepseek_v2":
        return 1  # DeepSeek-V2 groups only with topk_method="group_limited_greedy"
    return int(n_group) if int(n_group) > 1 else 1


# --------------------------------------------------------------------------------------
# Rewriting a checkpoint
# --------------------------------------------------------------------------------------


@dataclass
class PackResult:
    out_dir: Path
    permutations: list  # per MoE layer: packed expert i = source expert perm[i]
    clusters: list  # per MoE layer: [start, end) ranges of packed expert ids
    bytes_written: int = 0
    profile_path: Path | None = None  # the profile translated to the packed expert numbers


def _copy_range(src_fd: int, offset: int, nbytes: int, out, buf: bytearray):
    view = memoryview(buf)
    while nbytes > 0:
        n = os.preadv(src_fd, [view[: min(nbytes, len(buf))]], offset)
        if n <= 0:
            raise ModelError(f"short read while packing at offset {offset}")
        out.write(view[:n])
        offset += n
        nbytes -= n


def _write_shard(src: Path, dst: Path, rewrites: list, fds: dict, buf: bytearray) -> int:
    """Copy `src` to `dst`, replacing each (offset, nbytes) range by (source path, offset)."""
    rewrites = sorted(rewrites)
    size = src.stat().st_size
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            pos = 0
            for offset, nbytes, from_path, from_offset in rewrites:
                if offset < pos:
                    raise ModelError(f"{src}: overlapping expert ranges at offset {offset}")
                _copy_range(fds[src], pos, offset - pos, out, buf)
                _copy_range(fds[from_path], from_offset, nbytes, out, buf)
                pos = offset + nbytes
            _copy_range(fds[src], pos, size - pos, out, buf)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def pack(model, profile, out_dir, *, seed: int = 0, overwrite: bool = False, on_progress=None) -> PackResult:
    """Write `model` to `out_dir` with each layer's experts ordered by `profile`'s co-activation.

    `on_progress(done_bytes, total_bytes)` is called as shards are written. The output loads
    in stock mlx_lm and gives the same output; `out_dir/chronos-pack.json` holds the
    permutations and `out_dir/profile-<name>.json` the profile in the packed numbering."""
    from .loader import plan_model
    from .shards import ShardIndex
    from .traces import find_routers

    try:
        import networkx  # noqa: F401  (clustering; checked before anything is read or written)
    except ImportError:
        raise ModelError("pack needs networkx: pip install 'chronos-mlx[layout]'") from None
    plan = plan_model(model)
    src, out = plan.path, Path(out_dir).expanduser()
    check_can_create(out, ModelError)
    if out.resolve() == src.resolve():
        raise ModelError(f"{out}: pack writes a new checkpoint; the output must not be the model itself")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"{out}: directory is not empty (pass overwrite to replace it)")
    if not plan.switches:
        raise ModelError(f"{src}: no MoE layers, nothing to pack")
    profile = load_profile(profile)
    check_fingerprint(profile, _plan_fingerprint(plan))

    E = plan.info["num_experts"]
    groups = routing_groups(plan.config)
    layouts = [expert_order(profile.coactivation[l], profile.counts[l], seed, groups) for l in range(len(plan.layers))]
    perms = [perm for perm, _ in layouts]
    index = ShardIndex.open(src)

    # Every moved byte range: target (shard, offset, nbytes) <- (shard, offset) of the source.
    rewrites = defaultdict(list)
    routers = find_routers(plan.model)
    for layer, (router, perm) in enumerate(zip(routers, perms)):
        for tensor, _ in plan.layers[layer].values():
            for i, j in enumerate(perm):
                dst, frm = tensor.slices[i], tensor.slices[j]
                if i != j:
                    rewrites[dst.path].append((dst.offset, dst.nbytes, frm.path, frm.offset))
        # Every router array indexed by expert: weight, quantization scales/biases, bias,
        # DeepSeek's e_score_correction_bias.
        for name, arr in tree_flatten(router.module.parameters()):
            if arr.ndim == 0 or arr.shape[0] != E:
                continue
            full = f"{router.path}.{name}"
            if full not in index:
                raise ModelError(f"{src}: router tensor '{full}' is not in the shards under that name; cannot pack")
            info = index[full]
            row = info.nbytes // E
            for i, j in enumerate(perm):
                if i != j:
                    rewrites[info.path].append((info.offset + i * row, row, info.path, info.offset + j * row))

    out.mkdir(parents=True, exist_ok=True)
    for stale in ["config.json", *(p.name for p in out.glob("model*.safetensors"))]:
        (out / stale).unlink(missing_ok=True)  # until config.json is back, the output is not a model
    shards = sorted(index.file_sizes)
    total, done = sum(index.file_sizes.values()), 0
    fds = {p: os.open(p, os.O_RDONLY) for p in shards}
    buf = bytearray(_BLOCK)
    try:
        for path in shards:
            done += _write_shard(path, out / path.name, rewrites.get(path, []), fds, buf)
            if on_progress:
                on_progress(done, total)
    finally:
        for fd in fds.values():
            os.close(fd)
    for f in sorted(src.iterdir()):  # tokenizer, generation config, index, README ...
        skip = f.name in ("config.json", PACK_FILE) or f.name.startswith("profile-") or (
            f.name.startswith("model") and f.suffix == ".safetensors"
        )
        if f.is_file() and not skip:
            shutil.copy2(f, out / f.name)

    sidecar = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "source": str(src),
        "profile": profile.name,
        "seed": seed,
        "routing_groups": groups,
        "meaning": "packed expert i of a layer is expert permutation[i] of the source",
        "layers": [
            {"router": r.path, "permutation": p.tolist(), "clusters": c} for r, (p, c) in zip(routers, layouts)
        ],
    }
    atomic_write_text(out / PACK_FILE, json.dumps(sidecar, indent=1) + "\n")
    shutil.copy2(src / "config.json", out / "config.json")  # last: its presence means complete

    try:
        translated = profile.permuted(perms, _plan_fingerprint(plan_model(out)))
        translated.meta["packed_from"] = str(src)
        profile_path = save_profile(translated, out / f"profile-{profile.name}.json")
    except BaseException:
        (out / "config.json").unlink(missing_ok=True)  # not complete: it must not look like a model
        raise
    return PackResult(out, perms, [c for _, c in layouts], total, profile_path)


def _plan_fingerprint(plan) -> dict:
    """A lazily built (not loaded) model's profile fingerprint: only router weights are read."""
    return fingerprint_of(plan.model, plan.info["top_k"], {name: t for name, (t, _) in plan.layers[0].items()})


# --------------------------------------------------------------------------------------
# Merged reads
# --------------------------------------------------------------------------------------


def count_reads(loads, layers: list) -> dict:
    """Read calls for a trace of expert loads, one call per expert parameter (as the runtime
    reads today) versus one call per run of byte ranges contiguous in the same shard.

    `loads`: (layer, experts loaded together by one cache fill); `layers[l]`: that layer's
    ExpertTensors (e.g. `[p.source for p in cache.layers[l].params.values()]`)."""
    per_expert = merged = nbytes = 0
    for layer, experts in loads:
        for tensor in layers[layer]:
            ranges = sorted((s.path, s.offset, s.nbytes) for s in (tensor.slices[int(e)] for e in experts))
            if not ranges:
                continue
            breaks = sum(1 for a, b in zip(ranges, ranges[1:]) if (a[0], a[1] + a[2]) != (b[0], b[1]))
            per_expert += len(ranges)
            merged += 1 + breaks
            nbytes += sum(r[2] for r in ranges)
    return {
        "bytes": nbytes,
        "calls_per_expert": per_expert,
        "calls_merged": merged,
        "bytes_per_call_per_expert": nbytes / per_expert if per_expert else 0.0,
        "bytes_per_call_merged": nbytes / merged if merged else 0.0,
    }
