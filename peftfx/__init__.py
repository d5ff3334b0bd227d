"""peftfx: parameter-efficient fine-tuning as graph rewriting over torch.export / torch.fx."""

from typing import Any, cast

from .api import apply, get_peft_model, load, quantize
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import LoraConfig as LoraConfig  # the registry exports every method config; these for readers
from .config import PrefixTuningConfig as PrefixTuningConfig
from .config import PromptTuningConfig as PromptTuningConfig
from .errors import AdapterNotFoundError, CaptureError, CheckpointError, ConfigError, PeftFxError, TargetNotFoundError
from .interop import get_peft_model_state_dict, set_peft_model_state_dict
from .kbit_training import prepare_model_for_kbit_training
from .methods import config_classes as _config_classes
from .model import PeftFxModel
from .model import PeftFxModel as PeftModel  # PEFT's name: PeftModel.from_pretrained(model, path)
from .quant_config import QuantConfig

# Every registered method's config class is exported (peftfx.IA3Config, ...): a new method adds none here.
globals().update(_config_classes())

__version__ = "0.1.0"


def visualize(model: "PeftFxModel", path: str, **options: Any) -> str:
    """Draw a PeftFxModel's graph (or an fx.GraphModule) to .svg/.png/.pdf/.dot/.html; see
    `peftfx.tools.viz.visualize` for the options. Imported on first use, so `import peftfx`
    does not load graphviz or networkx."""
    from .tools.viz import visualize as _visualize

    return cast(str, _visualize(model, path, **options))


def export(model: "PeftFxModel", path: str, **options: Any) -> str:
    """Write a PeftFxModel as a .pt2 artifact that runs without peftfx (merged by default; `merged=False`,
    `aoti=True`); see `peftfx.tools.export.export`. Imported on first use."""
    from .tools.export import export as _export

    return cast(str, _export(model, path, **options))


__all__ = [
    "apply",
    "get_peft_model",
    "PeftModel",
    "load",
    "quantize",
    "visualize",
    "export",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "prepare_model_for_kbit_training",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
    *_config_classes(),
    "QuantConfig",
    "PeftFxModel",
    "PeftFxError",
    "ConfigError",
    "TargetNotFoundError",
    "CheckpointError",
    "AdapterNotFoundError",
    "CaptureError",
    "__version__",
]
