"""Adapter configs with PEFT's field names and defaults, so adapter_config.json files interchange.

Fields PEFT has but peftfx does not implement yet are accepted only at their PEFT default value; any
other value raises a ConfigError naming the field, rather than silently giving different numbers.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from ..errors import ConfigError
from .base import AdapterConfig, register_config

# PEFT's LoraConfig fields that peftfx does not implement: name -> the values accepted (PEFT's default first).
# They are fields of LoraConfig, so `LoraConfig(use_dora=False)` and PEFT's adapter_config.json files (PEFT
# writes all of them) are accepted; any other value is refused rather than silently giving other numbers.
UNSUPPORTED_LORA_FIELDS: dict[str, tuple[Any, ...]] = {
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
    "runtime_config": (None, {}, {"ephemeral_gpu_offload": False}),
}
# Values of those fields a registered LoRA variant implements (peftfx/methods/dora.py adds use_dora=True).
LORA_VARIANT_VALUES: dict[str, tuple[Any, ...]] = {}


def accept_lora_option(name: str, *values: Any) -> None:
    """Let LoraConfig take `values` for the PEFT field `name` (called by a LoRA-variant method module)."""
    LORA_VARIANT_VALUES[name] = LORA_VARIANT_VALUES.get(name, ()) + values


# Fields PEFT neither writes to adapter_config.json nor needs back (runtime-only options).
NOT_WRITTEN_FIELDS = ("runtime_config",)

# PEFT's default target modules when target_modules is None, by transformers model_type (PEFT's
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, copied: peftfx does not import peft; a test checks
# that every type of PEFT's table is here with the same modules). A string is a full-match regex.
DEFAULT_LORA_TARGETS: dict[str, Union[list[str], str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")


@register_config
@dataclass
class LoraConfig(AdapterConfig):
    """LoRA hyper-parameters; same names, defaults and meaning as `peft.LoraConfig`."""

    PEFT_TYPE: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # PEFT's bookkeeping fields (carried through, no behaviour) and its options peftfx does not implement
    # (UNSUPPORTED_LORA_FIELDS: accepted at their defaults only).
    megatron_core: Optional[str] = "megatron.core"
    qalora_group_size: int = 16
    use_dora: Optional[bool] = False
    lora_bias: Optional[bool] = False
    use_qalora: Optional[bool] = False
    use_bdlora: Any = None
    layer_replication: Optional[list[tuple[int, int]]] = None
    target_parameters: Optional[list[str]] = None
    trainable_token_indices: Any = None
    alora_invocation_tokens: Optional[list[int]] = None
    arrow_config: Any = None
    corda_config: Any = None
    eva_config: Any = None
    kasa_config: Any = None
    lora_ga_config: Any = None
    monteclora_config: Any = None
    velora_config: Any = None
    megatron_config: Optional[dict[str, Any]] = None
    loftq_config: Any = field(default_factory=dict)
    ensure_weight_tying: Optional[bool] = False
    runtime_config: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        super().__post_init__()

    def validate(self) -> None:
        """Refuse values that PEFT would refuse or that have no meaning, with the fix in the message.
        Types are checked strictly (a bool is not a rank, a string is not an alpha): a value that passed
        here and failed later would fail after the model was changed."""
        if not _is_positive_int(self.r):
            raise ConfigError(f"LoraConfig.r must be a positive integer, got {self.r!r}; use e.g. r=8.")
        if not _is_number(self.lora_alpha):
            raise ConfigError(
                f"LoraConfig.lora_alpha must be a number, got {self.lora_alpha!r}; use e.g. lora_alpha=16."
            )
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"LoraConfig.{name} must be a dict of regex -> value, got {getattr(self, name)!r}.")
        for pattern, rank in self.rank_pattern.items():
            if not _is_positive_int(rank):
                raise ConfigError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}.")
        for pattern, alpha in self.alpha_pattern.items():
            if not _is_number(alpha):
                raise ConfigError(f"alpha_pattern[{pattern!r}] must be a number, got {alpha!r}.")
        if not _is_number(self.lora_dropout) or not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        if not any(
            self.init_lora_weights is mode or (isinstance(mode, str) and self.init_lora_weights == mode)
            for mode in INIT_MODES
        ):
            raise ConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported; use True, False or 'gaussian'."
            )
        for name in ("fan_in_fan_out", "use_rslora", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LoraConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            _check_names(name, getattr(self, name), regex=name in ("target_modules", "exclude_modules"))
        for name in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, name):
                _check_regex(f"{name} key {pattern!r}", pattern)
        layers = self.layers_to_transform
        if layers is not None and not (_is_index(layers) or (isinstance(layers, list) and all(map(_is_index, layers)))):
            raise ConfigError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                "layers_to_transform cannot be used when target_modules is a str (regex or "
                "'all-linear'); give target_modules as a list of names instead."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only has an effect together with layers_to_transform; set both.")
        for name, accepted in UNSUPPORTED_LORA_FIELDS.items():
            accepted = accepted + LORA_VARIANT_VALUES.get(name, ())
            value = _as_plain(getattr(self, name))
            if not any(value == ok for ok in accepted):
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is a PEFT option peftfx does not support yet; "
                    f"remove it or set it to {accepted[0]!r}."
                )

    def scaling_for(self, r: int, alpha: float) -> float:
        """PEFT's scale of the low-rank update: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return alpha / (r**0.5) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, complete enough for `peft.PeftConfig.from_pretrained`."""
        out = dataclasses.asdict(self)
        for name in NOT_WRITTEN_FIELDS:
            out.pop(name)
        for name, accepted in UNSUPPORTED_LORA_FIELDS.items():
            if name in out and out[name] is None:
                out[name] = accepted[0]  # the value PEFT writes, so PEFT reads the file unchanged
        return dict(sorted(out.items()))


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_plain(value: Any) -> Any:
    """A config object (PEFT's LoraRuntimeConfig, ...) as a dict, to compare with the accepted defaults."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"LoraConfig.{field_name} is not a valid regular expression ({exc}); "
            "escape special characters such as '.' '(' '[' or give a list of names."
        ) from None


def _check_names(field_name: str, value: Any, regex: bool) -> None:
    """A list of module names, or (for regex fields) one regex string."""
    if value is None:
        return
    if isinstance(value, str):
        if regex and value != ALL_LINEAR:
            _check_regex(f"{field_name} ({value!r})", value)
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"LoraConfig.{field_name} must be a list of module names"
            f"{' or a regex string' if regex else ''}, got {value!r}."
        )
