"""Adapter configs with PEFT's field names and defaults, so adapter_config.json files interchange.

Fields PEFT has but peftfx does not implement yet are accepted only at their PEFT default value; any
other value raises a ConfigError naming the field, rather than silently giving different numbers.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .errors import ConfigError

PEFTFX_VERSION_KEY = "peftfx_version"

# PEFT's LoraConfig fields that peftfx does not implement: name -> the only accepted value(s).
# A loaded adapter_config.json may carry them (PEFT writes all of them); a non-default value is refused.
UNSUPPORTED_LORA_FIELDS: dict[str, tuple] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "corda_config": (None,),
    "eva_config": (None,),
    "kasa_config": (None,),
    "lora_ga_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
    "megatron_config": (None,),
    "loftq_config": ({}, None),
    "ensure_weight_tying": (False, None),
}
# PEFT fields that carry no behaviour for peftfx (bookkeeping or values only PEFT reads).
IGNORED_PEFT_FIELDS = {
    "auto_mapping", "peft_version", "megatron_core", "qalora_group_size",
    "inference_mode", "runtime_config",
}
# Values PEFT writes for the unsupported fields, so that files peftfx writes load in PEFT unchanged.
_PEFT_WRITTEN_DEFAULTS = {name: values[0] for name, values in UNSUPPORTED_LORA_FIELDS.items()}
_PEFT_WRITTEN_DEFAULTS.update({"megatron_core": "megatron.core", "qalora_group_size": 16,
                               "ensure_weight_tying": False, "auto_mapping": None})

# PEFT's default target modules when target_modules is None, by transformers model_type.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "t5": ["q", "v"], "bloom": ["query_key_value"], "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
}

# PEFT adds these heads to modules_to_save for classification tasks.
TASK_HEADS: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")


@dataclass
class LoraConfig:
    """LoRA hyper-parameters; same names, defaults and meaning as `peft.LoraConfig`."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.task_type, enum.Enum):
            self.task_type = self.task_type.value
        self.validate()

    def validate(self) -> None:
        """Refuse values that PEFT would refuse or that have no meaning, with the fix in the message."""
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}; use e.g. r=8.")
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}.")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        if self.init_lora_weights not in INIT_MODES:
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False or 'gaussian'.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError("layers_to_transform cannot be used when target_modules is a str (regex or "
                              "'all-linear'); give target_modules as a list of names instead.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only has an effect together with layers_to_transform; set both.")
        if self.peft_type != "LORA":
            raise ConfigError(f"LoraConfig got peft_type={self.peft_type!r}; expected 'LORA'.")

    def scaling_for(self, r: int, alpha: float) -> float:
        """PEFT's scale of the low-rank update: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r

    def resolved_modules_to_save(self) -> list[str]:
        """modules_to_save plus the task head PEFT adds for classification tasks."""
        names = list(self.modules_to_save or [])
        for head in TASK_HEADS.get(self.task_type or "", []):
            if head not in names:
                names.append(head)
        return names

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, complete enough for `peft.PeftConfig.from_pretrained`."""
        out = dict(_PEFT_WRITTEN_DEFAULTS)
        out.update(dataclasses.asdict(self))
        if isinstance(out["target_modules"], set):
            out["target_modules"] = sorted(out["target_modules"])
        return dict(sorted(out.items()))


from .prompt_config import PrefixTuningConfig, PromptLearningConfig, PromptTuningConfig  # noqa: E402

AdapterConfig = Union[LoraConfig, PromptLearningConfig]
CONFIG_CLASSES = {"LORA": LoraConfig, "PROMPT_TUNING": PromptTuningConfig, "PREFIX_TUNING": PrefixTuningConfig}


def config_from_dict(data: dict[str, Any], source: str = "config") -> AdapterConfig:
    """Build a config from adapter_config.json content; unknown keys and unsupported values are errors."""
    data = dict(data)
    peft_type = data.get("peft_type", "LORA")
    peft_type = getattr(peft_type, "value", peft_type)
    cls = CONFIG_CLASSES.get(peft_type)
    if cls is None:
        raise ConfigError(
            f"{source}: peft_type {peft_type!r} is not supported yet; supported: {sorted(CONFIG_CLASSES)}.")
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        if key in known:
            kwargs[key] = getattr(value, "value", value)
        elif cls is LoraConfig and key in UNSUPPORTED_LORA_FIELDS:
            if not _is_accepted_default(value, UNSUPPORTED_LORA_FIELDS[key]):
                raise ConfigError(
                    f"{source}: {key}={value!r} is a PEFT option peftfx does not support yet; "
                    f"remove it or set it to {UNSUPPORTED_LORA_FIELDS[key][0]!r}.")
        elif key in IGNORED_PEFT_FIELDS or key == PEFTFX_VERSION_KEY:
            continue
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(
            f"{source}: unknown config keys {sorted(unknown)} for {cls.__name__}; "
            f"known keys are {sorted(known)} (check for typos).")
    if isinstance(kwargs.get("target_modules"), (set, tuple)):
        kwargs["target_modules"] = sorted(kwargs["target_modules"])
    return cls(**kwargs)


def _is_accepted_default(value: Any, accepted: tuple) -> bool:
    return any(value == ok for ok in accepted)


def as_peftfx_config(config: Any) -> AdapterConfig:
    """Accept a peftfx config, the matching `peft` config object or a plain dict."""
    if isinstance(config, (LoraConfig, PromptLearningConfig)):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and hasattr(config, "peft_type"):
        return config_from_dict(to_dict(), source=type(config).__name__)
    raise ConfigError(
        f"Expected a peftfx config (LoraConfig, PromptTuningConfig, PrefixTuningConfig), the same peft "
        f"config, or a dict; got {type(config).__name__}.")
