"""peftfx: parameter-efficient fine-tuning as graph rewriting over torch.export / torch.fx."""
import os as _os

# In a source checkout passes/ and tools/ sit beside peftfx/; installed, they are peftfx.passes and
# peftfx.tools. Letting the package path include the checkout root makes both layouts import the same.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "passes")) and _os.path.isfile(
        _os.path.join(_root, "passes", "lora.py")):
    __path__.append(_root)  # noqa: F821 - __path__ is defined for packages
from .api import apply, load, quantize
from .config import LoraConfig
from .prompt_config import PrefixTuningConfig, PromptTuningConfig
from .quant_config import QuantConfig
from .errors import (AdapterNotFoundError, CaptureError, CheckpointError, ConfigError, PeftFxError,
                     TargetNotFoundError)
from .model import PeftFxModel

__version__ = "0.1.0"


def visualize(model: "PeftFxModel", path: str, **options) -> str:
    """Draw a PeftFxModel's graph (or an fx.GraphModule) to .svg/.png/.pdf/.dot/.html; see
    `peftfx.tools.visualize.visualize` for the options. Imported on first use, so `import peftfx`
    does not load graphviz or networkx."""
    from .tools.visualize import visualize as _visualize
    return _visualize(model, path, **options)


def export(model: "PeftFxModel", path: str, **options) -> str:
    """Write a PeftFxModel as a .pt2 artifact that runs without peftfx (merged by default; `merged=False`,
    `aoti=True`); see `peftfx.tools.export.export`. Imported on first use."""
    from .tools.export import export as _export
    return _export(model, path, **options)


__all__ = [
    "apply", "load", "quantize", "visualize", "export",
    "LoraConfig", "PromptTuningConfig", "PrefixTuningConfig", "QuantConfig", "PeftFxModel",
    "PeftFxError", "ConfigError", "TargetNotFoundError", "CheckpointError", "AdapterNotFoundError", "CaptureError",
    "__version__",
]
