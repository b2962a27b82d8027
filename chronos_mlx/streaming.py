"""StreamingSwitch: drop-in replacement for mlx_lm's SwitchGLU / SwitchMLP.

Same call signature, output shape and math as `mlx_lm.models.switch_layers`; the expert
weights come from an ExpertCache's slot arrays instead of [E, ...] parameters, and the
router's expert ids are remapped to slot ids by the Runtime (on the device when it can).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from . import late_rows
from .kernel_match import plan_call

SWITCH_TYPES = (SwitchGLU, SwitchMLP)


@dataclass
class ProjectionSpec:
    """How one projection multiplies: quantized (group_size, bits, mode) or plain, with bias or not."""

    name: str
    quantized: bool
    group_size: int = 0
    bits: int = 0
    mode: str = "affine"
    has_bias: bool = False
    has_biases: bool = False  # affine quantization offsets


def projection_specs(module) -> list[ProjectionSpec]:
    names = ("gate_proj", "up_proj", "down_proj") if isinstance(module, SwitchGLU) else ("fc1", "fc2")
    specs = []
    for n in names:
        proj = getattr(module, n)
        quantized = "scales" in proj
        specs.append(
            ProjectionSpec(
                n,
                quantized,
                getattr(proj, "group_size", 0),
                getattr(proj, "bits", 0),
                getattr(proj, "mode", "affine"),
                "bias" in proj,
                quantized and proj.get("biases") is not None,
            )
        )
    return specs


class StreamingSwitch(nn.Module):
    """Computes a MoE layer's experts from cache slots. Holds no parameters of its own."""

    def __init__(self, original, layer: int, runtime):
        super().__init__()
        self.activation = original.activation
        # Model code may read other members of the module it called (muse_spark keeps a
        # norm under its experts): carry over everything but the expert projections.
        own = {spec.name for spec in projection_specs(original)}
        for key, value in original.items():
            if key not in own:
                self[key] = value
        for key, value in vars(original).items():
            if not key.startswith("_") and not hasattr(self, key):
                object.__setattr__(self, key, value)
        object.__setattr__(self, "_glu", isinstance(original, SwitchGLU))
        object.__setattr__(self, "_specs", {s.name: s for s in projection_specs(original)})
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_runtime", runtime)

    def _slots(self, name: str):
        """(spec, weight, scales, biases, bias) slot arrays of a projection. The slot arrays
        are allocated once and written in place, so they are looked up once (this runs
        for every layer of every token, where Python time can be the bottleneck)."""
        found = self.__dict__.get("_slot_cache")
        if found is None:
            params = self._runtime.cache.layers[self._layer].params
            get = lambda key: params[key].slots if key in params else None  # noqa: E731
            found = {
                n: (spec, get(f"{n}.weight"), get(f"{n}.scales"), get(f"{n}.biases"), get(f"{n}.bias"))
                for n, spec in self._specs.items()
            }
            object.__setattr__(self, "_slot_cache", found)
        return found[name]

    def _plan(self, name: str, total_rows: int):
        """How stock's call over `total_rows` rows computes them (kernel_match.py); kept per
        (projection, rows): this runs three times a layer of every token."""
        plans = self.__dict__.get("_plans")
        if plans is None:
            plans = {}
            object.__setattr__(self, "_plans", plans)
        plan = plans.get((name, total_rows))
        if plan is None:
            L = self._runtime.cache.layers[self._layer]
            plan = plans[(name, total_rows)] = plan_call(total_rows, self._specs[name].quantized, L.num_experts,
                                                         L.num_slots)
        return plan

    def _calls(self, total_rows: int) -> dict:
        """{projection: (spec, weight, scales, biases, bias, sorted_indices)} of a call over
        `total_rows` rows, kept per row count: one lookup a layer of every token (three
        projections each looked up in two tables cost a measurable share of a GPU step's host time)."""
        calls = self.__dict__.get("_calls_by_rows")
        if calls is None:
            calls = {}
            object.__setattr__(self, "_calls_by_rows", calls)
        got = calls.get(total_rows)
        if got is None:
            got = calls[total_rows] = {
                name: (*self._slots(name), self._plan(name, total_rows).sorted_indices) for name in self._specs
            }
        return got

    def _project(self, call: tuple, x, idx):
        spec, w, scales, biases, bias, sorted_indices = call
        if spec.quantized:
            x = mx.gather_qmm(
                x,
                w,
                scales,
                biases if spec.has_biases else None,
                rhs_indices=idx,
                transpose=True,
                group_size=spec.group_size,
                bits=spec.bits,
                mode=spec.mode,
                sorted_indices=sorted_indices,
            )
        else:
            x = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)
        if spec.has_bias:
            x = x + mx.expand_dims(bias[idx], -2)
        return x

    def _experts(self, x, idx, total_rows: int):
        """The expert products of rows `x` (their slots `idx`), part of a layer call of
        `total_rows` rows: each projection called as stock's call over all of them is."""
        calls = self._calls(total_rows)
        if self._glu:
            x_up = self._project(calls["up_proj"], x, idx)
            x_gate = self._project(calls["gate_proj"], x, idx)
            return self._project(calls["down_proj"], self.activation(x_up, x_gate), idx)
        x = self.activation(self._project(calls["fc1"], x, idx))
        return self._project(calls["fc2"], x, idx)

    def _padded_experts(self, x_rows, idx, total_rows: int):
        """`_experts` of part of a call (slot ids `idx`: a list or numpy array), padded with
        copies of its last row to the rows the kernel stock's whole call uses needs
        (kernel_match.py); the copies are dropped."""
        ids = idx if isinstance(idx, list) else idx.tolist()
        n = len(ids)
        need = max(self._plan(name, total_rows).min_rows for name in self._specs)
        if n < need:
            ids = ids + [ids[-1]] * (need - n)
            x_rows = mx.concatenate([x_rows, mx.repeat(x_rows[-1:], need - n, axis=0)])
        return self._experts(x_rows, mx.array(ids, dtype=mx.uint32), total_rows)[:n]

    def __call__(self, x, indices) -> mx.array:
        # (No stop_gradient as stock's SwitchGLU outside training: a graph node a layer, and on
        # a GPU the host's work to build and launch a step's nodes is the decode's pace.)
        if late_rows.applies(self._runtime, self._layer, indices):
            return late_rows.compute(self._runtime, self, self._layer, x, indices)
        slots = self._runtime.route(self._layer, indices, x)
        x = mx.expand_dims(x, (-2, -3))
        if slots is None:  # more experts than slots: stream them through in waves
            return self._waves(x, indices)
        # Same sort-for-locality rule as SwitchGLU; rows are independent, so sorting by
        # slot id instead of expert id changes nothing in the result.
        if indices.size >= 64:
            *_, M = indices.shape
            flat = slots.flatten()
            order = mx.argsort(flat)
            inv_order = mx.argsort(order)
            y = self._experts(x.flatten(0, -3)[order // M], flat[order], indices.size)
            y = mx.unflatten(y[inv_order], 0, indices.shape)
        else:
            y = self._experts(x, slots, indices.size)
        if self._runtime.mode == "sync" and not self._runtime.gated(self._layer) and not self._runtime.cache.layers[self._layer].full:
            # Routed on the spot: start this layer's experts now, so they compute while
            # Python builds the next layer's graph. (A gated layer must not start before
            # its gate opens.)
            mx.async_eval(y)
            if self._runtime.cache.deferred:  # inline prefetch reads overlap these experts
                self._runtime.cache.run_deferred()
        return y.squeeze(-2)

    def _waves(self, x, indices):
        """Compute a batch that needs more experts than the layer has slots.

        Pairs (token, k) are sorted by expert and cut into waves of at most `slots`
        distinct experts; each wave's experts are loaded, its rows computed and evaluated
        before the next wave overwrites the slots. Each output row depends on exactly one
        expert, and each wave goes through the kernel the one-shot call would use (padded
        where the backend picks kernels by row count: kernel_match.py), so the result equals
        the one-shot computation bit for bit.
        """
        *_, M = indices.shape
        flat = np.array(indices).reshape(-1).astype(np.int64)
        order = np.argsort(flat, kind="stable")
        uniq, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
        # The most used experts go in the last (full) wave: they stay resident for the
        # decode steps that follow a prefill (the order of waves changes no output row).
        by_use = np.argsort(counts, kind="stable")
        cap = self._runtime.cache.layers[self._layer].num_slots
        waves = [by_use[max(0, end - cap) : end] for end in range(len(uniq), 0, -cap)][::-1]
        x_rows = x.flatten(0, -3)
        outs, perm = [], []
        for members in waves:
            wave = uniq[members]
            self._runtime.load_for(self._layer, wave)
            self._runtime.cache.mark_used(self._layer, wave)
            rows = np.concatenate([order[starts[i] : starts[i] + counts[i]] for i in members])
            slot_ids = self._runtime.cache.slots_for(self._layer, flat[rows])
            by_slot = np.argsort(slot_ids, kind="stable")
            rows, slot_ids = rows[by_slot], slot_ids[by_slot]
            y = self._padded_experts(x_rows[mx.array(rows // M)], slot_ids, flat.size)
            mx.eval(y)  # the next wave reuses these slots
            outs.append(y)
            perm.append(rows)
        perm = np.concatenate(perm)
        inv = np.empty_like(perm)
        inv[perm] = np.arange(len(perm))
        y = mx.concatenate(outs, axis=0)[mx.array(inv)]
        return mx.unflatten(y, 0, indices.shape).squeeze(-2)
