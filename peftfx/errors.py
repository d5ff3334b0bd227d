"""Exception types: one per kind of user mistake, so callers can catch precisely."""


class PeftFxError(Exception):
    """Base class of every error peftfx raises on purpose."""


class ConfigError(PeftFxError, ValueError):
    """A config value is invalid (bad rank, unknown key, unsupported option)."""


class TargetNotFoundError(PeftFxError, ValueError):
    """No node of the captured graph matched the config's targets."""


class CheckpointError(PeftFxError, ValueError):
    """A checkpoint does not fit the model (shape mismatch, unknown or missing keys)."""


class AdapterNotFoundError(PeftFxError, FileNotFoundError):
    """An adapter path or hub repo id could not be resolved to files."""


class CaptureError(PeftFxError, RuntimeError):
    """torch.export could not capture the model for the given inputs."""
