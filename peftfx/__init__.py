"""peftfx: parameter-efficient fine-tuning as graph rewriting over torch.export / torch.fx."""
import os as _os

# In a source checkout passes/ and tools/ sit beside peftfx/; installed, they are peftfx.passes and
# peftfx.tools. Letting the package path include the checkout root makes both layouts import the same.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "passes")) and _os.path.isfile(
        _os.path.join(_root, "passes", "lora.py")):
    __path__.append(_root)  # noqa: F821 - __path__ is defined for packages
from .api import apply, load
from .config import LoraConfig
from .prompt_config import PrefixTuningConfig, PromptTuningConfig
from .errors import (AdapterNotFoundError, CaptureError, CheckpointError, ConfigError, PeftFxError,
                     TargetNotFoundError)
from .model import PeftFxModel

__version__ = "0.1.0"

__all__ = [
    "apply", "load", "LoraConfig", "PromptTuningConfig", "PrefixTuningConfig", "PeftFxModel", "PeftFxError", "ConfigError", "TargetNotFoundError",
    "CheckpointError", "AdapterNotFoundError", "CaptureError", "__version__",
]
