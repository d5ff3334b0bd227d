"""Adapter configs with PEFT's field names and defaults: one base class (`base.AdapterConfig`) and a
module per family. Method modules may define and register further config classes (methods/ia3.py)."""

from .base import (
    CONFIG_CLASSES,
    PEFTFX_VERSION_KEY,
    TASK_HEADS,
    AdapterConfig,
    as_peftfx_config,
    config_from_dict,
    register_config,
)
from .lora import (
    ALL_LINEAR,
    DEFAULT_LORA_TARGETS,
    NOT_WRITTEN_FIELDS,
    UNSUPPORTED_LORA_FIELDS,
    LoraConfig,
    accept_lora_option,
)
from .prompt import PrefixTuningConfig, PromptLearningConfig, PromptTuningConfig, fill_from_model

__all__ = [
    "CONFIG_CLASSES",
    "PEFTFX_VERSION_KEY",
    "TASK_HEADS",
    "AdapterConfig",
    "as_peftfx_config",
    "config_from_dict",
    "register_config",
    "ALL_LINEAR",
    "DEFAULT_LORA_TARGETS",
    "NOT_WRITTEN_FIELDS",
    "UNSUPPORTED_LORA_FIELDS",
    "LoraConfig",
    "accept_lora_option",
    "PrefixTuningConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "fill_from_model",
]
