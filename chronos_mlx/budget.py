"""Expert budgets: "6GB", "512MiB", a fraction "0.25" of all expert bytes, or "25%"."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

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


# --------------------------------------------------------------------------------------
# --expert-budget auto
# --------------------------------------------------------------------------------------

AUTO = "auto"
DEFAULT_CONTEXT_TOKENS = 4096
PROCESS_OVERHEAD_BYTES = 200 * 1000**2  # Python, MLX and the tokenizer (measured: ~150 MB on the demo model)
HEADROOM_FRACTION = 0.10  # of the memory left after the overhead: activations, allocator slack


def is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def kv_bytes_per_token(config: dict, dtype_bytes: int = 2) -> int:
    """Bytes of KV cache one token takes in every layer (standard or multi-head latent attention)."""
    c = dict(config.get("text_config") or {}, **{k: v for k, v in config.items() if k != "text_config"})
    layers = int(c.get("num_hidden_layers") or 0)
    heads = int(c.get("num_attention_heads") or 1)
    if c.get("kv_lora_rank"):  # deepseek_v2/v3 in mlx_lm cache per-head keys and values
        k = int(c.get("qk_nope_head_dim", 0)) + int(c.get("qk_rope_head_dim", 0))
        v = int(c.get("v_head_dim", k))
        return layers * heads * (k + v) * dtype_bytes
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or (int(c.get("hidden_size", 0)) // heads))
    return 2 * layers * kv_heads * head_dim * dtype_bytes


@dataclass
class AutoBudget:
    """What `--expert-budget auto` chose and from what (all sizes in bytes)."""

    budget: str  # a value for `chronos_mlx.load(expert_budget=...)`
    fraction: float  # of all experts
    slots_per_layer: int
    expert_bytes: int  # what the budget holds
    memory_bytes: int
    memory_source: str
    dense_bytes: int
    kv_bytes: int
    context_tokens: int
    overhead_bytes: int
    headroom_bytes: int
    fits: bool  # everything resident

    def line(self) -> str:
        """One line: what it chose and why."""
        def mb(n):
            return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

        head = (
            f"expert budget auto = {self.fraction:.3g} ({self.slots_per_layer} experts/layer, {mb(self.expert_bytes)})"
        )
        why = (
            f"{mb(self.memory_bytes)} usable ({self.memory_source}) - dense {mb(self.dense_bytes)}"
            f" - KV for {self.context_tokens} tokens {mb(self.kv_bytes)}"
            f" - overhead {mb(self.overhead_bytes)} - headroom {mb(self.headroom_bytes)}"
        )
        tail = ": every expert fits" if self.fits else ""
        return f"{head}: {why}{tail}"

    def to_dict(self) -> dict:
        return asdict(self)


def auto_budget(
    info: dict,
    config: dict,
    *,
    memory_bytes: int | None = None,
    memory_source: str | None = None,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    kv_dtype_bytes: int | None = None,
) -> AutoBudget:
    """The largest expert budget that fits next to the dense weights, the KV cache for
    `context_tokens` tokens, the process overhead and headroom in `memory_bytes` (default:
    what the machine has available, see `chronos_mlx.memory`). 1.0 where everything fits;
    a BudgetError saying what does not fit when not even one token's experts do.

    `info` is `chronos_mlx.loader.plan_model(...).info`."""
    if memory_bytes is None:
        from .memory import machine_memory

        m = machine_memory()
        memory_bytes, memory_source = m.available_bytes, memory_source or m.source
    memory_source = memory_source or "given"
    if kv_dtype_bytes is None:
        kv_dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(info.get("dtype")), 2)
    dense = int(info.get("dense_bytes") or 0)
    kv = kv_bytes_per_token(config, kv_dtype_bytes) * int(context_tokens)
    overhead = PROCESS_OVERHEAD_BYTES
    headroom = int(max(0, memory_bytes - overhead) * HEADROOM_FRACTION)
    room = memory_bytes - dense - kv - overhead - headroom
    layers = int(info.get("moe_layers") or 0)
    experts = int(info.get("num_experts") or 0)
    per = int(info.get("bytes_per_expert") or 0)
    top_k = int(info.get("top_k") or 1)
    per_slot = per * layers
    common = dict(
        memory_bytes=int(memory_bytes), memory_source=memory_source, dense_bytes=dense, kv_bytes=kv,
        context_tokens=int(context_tokens), overhead_bytes=overhead, headroom_bytes=headroom,
    )
    if not layers or not per_slot:  # no experts: nothing to budget
        return AutoBudget("1.0", 1.0, 0, 0, fits=room >= 0, **common)
    slots = min(experts, int(max(room, 0) // per_slot))
    if slots >= experts:
        return AutoBudget("1.0", 1.0, experts, experts * per_slot, fits=True, **common)
    if slots < top_k:
        need = dense + kv + overhead + top_k * per_slot
        need = int(need / (1 - HEADROOM_FRACTION)) + 1
        raise BudgetError(
            f"the model cannot run in {memory_bytes / 1e9:.2f} GB ({memory_source}): the dense weights "
            f"({dense / 1e9:.2f} GB), the KV cache for {context_tokens} tokens ({kv / 1e9:.2f} GB), "
            f"{overhead / 1e6:.0f} MB of process overhead, headroom and one token's experts "
            f"({top_k} per layer, {top_k * per_slot / 1e9:.2f} GB) need about {need / 1e9:.2f} GB; "
            "free memory, use a shorter context, or pass --memory-limit / an explicit --expert-budget"
        )
    return AutoBudget(f"{slots * per_slot}B", slots / experts, slots, slots * per_slot, fits=False, **common)


def parse_memory(value) -> int:
    """A memory size with a unit ('16GB', '12GiB', '800MB') in bytes."""
    text = str(value).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", text)
    if not m or m.group(2) not in _UNITS or m.group(2) in ("", "b") and float(m.group(1)) < 1e6:
        raise BudgetError(f"cannot parse memory size '{value}': use a size with a unit, e.g. 16GB or 12GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def resolve_budget(value, model=None, *, dtype=None, memory_limit=None, context_tokens: int = DEFAULT_CONTEXT_TOKENS):
    """(budget for `chronos_mlx.load`, AutoBudget or None): `value` unchanged unless it is
    'auto', which is worked out from the model's plan (no weights read) and the memory
    (`memory_limit` bytes or size string, else the machine's)."""
    if not is_auto(value):
        return value, None
    from .loader import plan_model

    plan = plan_model(model, dtype)
    limit = parse_memory(memory_limit) if isinstance(memory_limit, str) else memory_limit
    choice = auto_budget(
        plan.info, plan.config, memory_bytes=limit, memory_source="--memory-limit" if limit else None,
        context_tokens=context_tokens,
    )
    return choice.budget, choice
