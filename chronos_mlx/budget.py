"""Expert budgets: "6GB", "512MiB", a fraction "0.25" of all expert bytes, or "25%"."""

from __future__ import annotations

import re

from .errors import BudgetError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_budget(value) -> tuple[str, float]:
    """Return ("fraction", f) or ("bytes", n). Bare numbers <= 1 are fractions, larger ones bytes."""
    if isinstance(value, (int, float)):
        text = repr(float(value))
    else:
        text = str(value).strip().lower().replace(" ", "")
    if text.endswith("%"):
        try:
            f = float(text[:-1]) / 100
        except ValueError:
            raise BudgetError(f"cannot parse expert budget '{value}'")
        return _fraction(f, value)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise BudgetError(
            f"cannot parse expert budget '{value}': use bytes with a unit (6GB, 512MiB) or a fraction (0.25, 25%)"
        )
    number, unit = float(m.group(1)), m.group(2)
    if unit == "" and number <= 1.0:
        return _fraction(number, value)
    return "bytes", number * _UNITS[unit]


def _fraction(f: float, value) -> tuple[str, float]:
    if not 0 < f <= 1:
        raise BudgetError(f"expert budget fraction must be in (0, 1], got '{value}'")
    return "fraction", f


def slots_for_budget(value, *, num_layers: int, num_experts: int, top_k: int, bytes_per_expert: int) -> int:
    """Slots per MoE layer that the budget buys; an error when one token's experts don't fit."""
    kind, amount = parse_budget(value)
    if kind == "fraction":
        slots = int(amount * num_experts + 1e-9)
    else:
        slots = int(amount // (bytes_per_expert * num_layers))
    slots = min(slots, num_experts)
    if slots < top_k:
        need = top_k * bytes_per_expert * num_layers
        raise BudgetError(
            f"expert budget '{value}' holds {slots} expert(s) per layer, but one token uses {top_k} per layer: "
            f"use at least {need / 1e6:.1f}MB or {top_k / num_experts:.4g}"
        )
    return slots
