"""Errors a user can cause (bad files, bad options). The CLI prints them as one line."""


class ChronosError(Exception):
    """Base class for user-facing errors: the message says what is wrong and where."""


class ShardError(ChronosError):
    """A safetensors shard is missing, truncated, changed or inconsistent with config.json."""


class ModelError(ChronosError):
    """The model cannot be resolved, or is not a model chronos can stream."""


class BudgetError(ChronosError):
    """The expert budget cannot be parsed or is too small to run one token."""


class ProfileError(ChronosError):
    """A profile file is corrupt, truncated or belongs to another model."""


class DeviceWaitError(ChronosError, RuntimeError):
    """Device-wait routing could not finish a step: loading for a waiting layer failed, or a
    layer's kernel stopped waiting for the loading thread. The step is refused, never wrong."""
