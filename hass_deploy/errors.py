"""User-facing errors.

A `HassDeployError` is a mistake the user can fix (a bad path, a draft that belongs to another target, an
option out of range). The CLI prints its message as one line and exits with code 1, without a traceback;
anything else is a bug and keeps its traceback.
"""


class HassDeployError(Exception):
    """A one-line, user-fixable error."""


class ModelLoadError(HassDeployError):
    """A model directory is missing, malformed, or of an unsupported architecture."""


class DraftMismatchError(HassDeployError):
    """A draft head does not belong to the target it is paired with."""


class CacheCapacityError(HassDeployError):
    """A prompt or request does not fit the static KV buffers."""


class ConfigError(HassDeployError, ValueError):
    """An option or configuration value out of range."""
