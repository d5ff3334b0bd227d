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


class GraphvizNotFoundError(PeftFxError, RuntimeError):
    """graphviz's `dot` program is needed to write .svg/.png/.pdf/.html and is not installed."""


class ExportError(PeftFxError, ValueError):
    """The model cannot be exported as asked; the message says what to change."""


class UnsafeMergeError(PeftFxError, ValueError):
    """safe_merge found NaN or Inf in a merged weight; nothing was changed."""


class MissingDependencyError(PeftFxError, ImportError):
    """An optional dependency a feature needs is not installed."""


class DemoError(PeftFxError, RuntimeError):
    """A check of `peftfx demo` failed (for example reloaded logits differ)."""
