"""chronos-mlx: run MoE models whose experts do not fit in memory, with mlx_lm's exact output."""

from .errors import BudgetError, ChronosError, ModelError, ProfileError, ShardError
from .loader import DEFAULT_MODEL, load

__version__ = "0.1.0"
__all__ = ["load", "DEFAULT_MODEL", "ChronosError", "ModelError", "ShardError", "BudgetError", "ProfileError"]
