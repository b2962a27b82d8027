"""MoE layers whose experts are a Python list of MLP modules (dbrx), streamed like the rest.

Such a block reads the router's choice on the host itself and calls `experts[e](x)` for
each chosen expert; mlx_lm keeps one MLP module per expert. We swap each list entry for a
`StreamingExpert`: the same module class computes the same function, but with the
expert's weights taken from its cache slot (loaded on demand) instead of its own
parameters. Nothing of the model's code changes, so the output is the stock one.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx.nn as nn

from .errors import ShardError
from .layout import ExpertSlice, ExpertTensor

_LINEARS = (nn.Linear, nn.QuantizedLinear)
_PARAMS = ("weight", "scales", "biases", "bias")
# Outputs computed from slots but not yet evaluated, kept per layer: their slots must not
# be reused before they are (at most this many, then they are evaluated anyway).
_MAX_PENDING = 64


def find_expert_lists(model) -> list:
    """(path of the `experts` list, the list) for every block that keeps experts as a list
    of identical MLP modules built from linear layers."""
    found = []
    for name, module in model.named_modules():
        experts = module.get("experts") if isinstance(module, dict) else None
        if not isinstance(experts, list) or len(experts) < 2:
            continue
        if len({type(e) for e in experts}) != 1 or not isinstance(experts[0], nn.Module):
            continue
        if not any(isinstance(m, _LINEARS) for m in experts[0].children().values()):
            continue
        found.append((f"{name}.experts" if name else "experts", experts))
    return found


def projections(expert) -> list:
    return [name for name, m in expert.children().items() if isinstance(m, _LINEARS)]


def locate(index, path: str, experts: list) -> dict:
    """{"w1.weight": ExpertTensor, ...}: the per-expert tensors `path.<e>.<proj>.<param>`."""
    out = {}
    for proj in projections(experts[0]):
        for pname in _PARAMS:
            if experts[0][proj].get(pname) is None:
                continue
            names = [f"{path}.{e}.{proj}.{pname}" for e in range(len(experts))]
            missing = [n for n in names if n not in index]
            if missing:
                raise ShardError(
                    f"{index.root}: no tensor '{missing[0]}' (expert lists are streamed from "
                    "per-expert tensors as mlx-lm saves them; convert the checkpoint with mlx_lm first)"
                )
            infos = [index[n] for n in names]
            shape = tuple(infos[0].shape)
            for info in infos:
                if tuple(info.shape) != shape or info.dtype != infos[0].dtype:
                    raise ShardError(f"{info.path}: '{info.name}' differs in shape or dtype from expert 0")
            slices = [ExpertSlice(i.path, i.offset, i.nbytes) for i in infos]
            out[f"{proj}.{pname}"] = ExpertTensor(f"{path}.{proj}.{pname}", infos[0].dtype, shape, slices)
    return out


class ExpertListLayer:
    """What the StreamingExperts of one layer share: the layer index and pending outputs."""

    def __init__(self, layer: int, runtime):
        self.layer = layer
        self.runtime = runtime
        self.pending: list = []  # outputs not yet known to be evaluated
        self.in_use: set = set()  # the experts they read

    def slot(self, expert: int) -> int:
        """The slot of `expert`, loading it if needed without reusing a slot still read."""
        rt = self.runtime
        L = rt.cache.layers[self.layer]
        resident = L.slot_of[expert] >= 0
        if not resident and len(self.in_use - {expert}) >= L.num_slots or len(self.pending) >= _MAX_PENDING:
            mx.eval(self.pending)
            self.pending, self.in_use = [], set()
        if resident:
            L.counters.hits += 1
        else:
            rt.load_for(self.layer, [expert], protect=self.in_use)
        rt.cache.mark_used(self.layer, [expert])
        self.in_use.add(expert)
        return int(L.slot_of[expert])


class StreamingExpert(nn.Module):
    """Stands in for expert `index` of a list: the original module's math on slot weights."""

    def __init__(self, original, index: int, shared: ExpertListLayer):
        super().__init__()
        view = copy.copy(original)  # a shallow module copy whose weights are set per call
        for proj in projections(original):
            linear = copy.copy(original[proj])
            for pname in _PARAMS:
                if pname in linear:
                    linear[pname] = mx.zeros((1,))  # drop the lazy file-backed weight
            view[proj] = linear
        object.__setattr__(self, "_view", view)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_shared", shared)

    def __call__(self, x):
        shared = self._shared
        slot = shared.slot(self._index)
        params = shared.runtime.cache.layers[shared.layer].params
        view = self._view
        for key, p in params.items():
            proj, pname = key.split(".")
            view[proj][pname] = p.slots[slot]
        y = type(view).__call__(view, x)
        shared.pending.append(y)
        return y
