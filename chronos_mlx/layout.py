"""Which bytes of which shard hold expert e of a MoE layer's projection parameter.

Two layouts are met in the wild:
- mlx-community: experts stacked per layer (`...switch_mlp.gate_proj.weight` of shape [E, ...]);
  expert e is the e-th contiguous slice of that tensor;
- Hugging Face: one tensor per expert (`...experts.7.gate_proj.weight`), stacked by the
  mlx_lm model class's `sanitize()` on load.

For the second we do not guess the naming scheme of each architecture: we run the model's
own `sanitize()` on tiny marker arrays, one per per-expert tensor, and read back which
marker ended up at which position of which stacked name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ShardError
from .shards import DTYPES, ShardIndex

_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass(frozen=True)
class ExpertSlice:
    """The bytes of one expert's share of one parameter."""

    path: Path
    offset: int
    nbytes: int


@dataclass
class ExpertTensor:
    """One parameter (say `gate_proj.scales`) of one MoE layer, split by expert."""

    name: str  # the stacked parameter path mlx_lm uses
    dtype: str  # safetensors dtype on disk
    shape: tuple  # per expert
    slices: list  # ExpertSlice per expert id

    @property
    def nbytes(self) -> int:
        return self.slices[0].nbytes


def per_expert_sources(index: ShardIndex, model) -> dict[str, list[str]]:
    """Map each stacked parameter name sanitize() would build to its per-expert source names."""
    names = [n for n in index.tensors if _PER_EXPERT.search(n)]
    if not names or not hasattr(model, "sanitize"):
        return {}
    markers = {n: mx.array([float(i)], dtype=mx.float32) for i, n in enumerate(names)}
    out = model.sanitize(dict(markers))
    sources = {}
    for name, value in out.items():
        if name in markers or not isinstance(value, mx.array):
            continue
        if value.ndim != 2 or value.shape[1] != 1:
            continue
        ids = np.array(value.astype(mx.float32)).reshape(-1)
        sources[name] = [names[int(i)] for i in ids]
    return sources


def locate_expert_tensor(
    index: ShardIndex, sources: dict, name: str, num_experts: int, expected_shape: tuple
) -> ExpertTensor:
    """Find the per-expert byte ranges of the stacked parameter `name` ([E, *expected_shape])."""
    expected_shape = tuple(expected_shape)
    if name in index:
        info = index[name]
        if tuple(info.shape) != (num_experts, *expected_shape):
            raise ShardError(
                f"{info.path}: tensor '{name}' has shape {list(info.shape)} but config.json implies "
                f"{[num_experts, *expected_shape]}"
            )
        per = info.nbytes // num_experts
        slices = [ExpertSlice(info.path, info.offset + e * per, per) for e in range(num_experts)]
        return ExpertTensor(name, info.dtype, expected_shape, slices)
    if name in sources:
        srcs = sources[name]
        if len(srcs) != num_experts:
            raise ShardError(f"{index.root}: '{name}' has {len(srcs)} per-expert tensors, expected {num_experts}")
        infos = [index[s] for s in srcs]
        for info in infos:
            if tuple(info.shape) != expected_shape:
                raise ShardError(
                    f"{info.path}: tensor '{info.name}' has shape {list(info.shape)} but config.json "
                    f"implies {list(expected_shape)}"
                )
            if info.dtype != infos[0].dtype:
                raise ShardError(f"{info.path}: tensor '{info.name}' has dtype {info.dtype}, others {infos[0].dtype}")
        slices = [ExpertSlice(i.path, i.offset, i.nbytes) for i in infos]
        return ExpertTensor(name, infos[0].dtype, expected_shape, slices)
    raise ShardError(f"{index.root}: no tensor holds the experts of '{name}' (unsupported checkpoint layout)")


def dtype_itemsize(st_dtype: str) -> int:
    return DTYPES[st_dtype][1]
