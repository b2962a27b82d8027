"""chronos-mlx: run MoE models whose experts do not fit in memory, with mlx_lm's exact output."""

from . import _startup

if _startup.is_cli_process():  # before the heavy imports below: Ctrl-C now ends quietly
    _startup.quiet_startup_interrupts()

from .errors import BudgetError, ChronosError, ModelError, ProfileError, ShardError
from .loader import DEFAULT_MODEL
from .loader import load as _load


def load(model=None, expert_budget=1.0, **kwargs):
    """`chronos_mlx.loader.load`, where `expert_budget="auto"` also works: the largest budget
    that fits this machine's available memory (or `memory_limit=`, bytes or "16GB") next to
    the dense weights, a 4096-token KV cache and headroom (see `chronos_mlx.budget.auto_budget`)."""
    memory_limit = kwargs.pop("memory_limit", None)
    if isinstance(expert_budget, str) and expert_budget.strip().lower() == "auto":
        from .budget import resolve_budget

        expert_budget, _ = resolve_budget(expert_budget, model, dtype=kwargs.get("dtype"), memory_limit=memory_limit)
    return _load(model, expert_budget, **kwargs)


load.__doc__ = (load.__doc__ or "") + "\n\n" + (_load.__doc__ or "")

__version__ = "0.1.0"
__all__ = ["load", "DEFAULT_MODEL", "ChronosError", "ModelError", "ShardError", "BudgetError", "ProfileError"]
