"""Prompt-learning configs (prompt tuning, prefix tuning) with PEFT's field names and defaults.

The model-dependent fields (`token_dim`, `num_layers`, `num_attention_heads`, ...) may be left None:
`fill_from_model` completes them from the model's config the way PEFT does, and the filled values are
what adapter_config.json records, so PEFT reads the file unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, cast

from ..errors import ConfigError
from .base import AdapterConfig, register_config

PROMPT_INIT_MODES = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
# transformers model types with an encoder and a decoder: PEFT doubles the virtual tokens for them.
_ENCODER_DECODER_HINT = "is_encoder_decoder"


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields PEFT's prompt-learning configs share."""

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if (
            not isinstance(self.num_virtual_tokens, int)
            or isinstance(self.num_virtual_tokens, bool)
            or self.num_virtual_tokens <= 0
        ):
            raise ConfigError(
                f"{name}.num_virtual_tokens must be a positive integer, got "
                f"{self.num_virtual_tokens!r}; use e.g. num_virtual_tokens=20."
            )

    @property
    def total_virtual_tokens(self) -> int:
        return cast(int, self.num_virtual_tokens) * (self.num_transformer_submodules or 1)  # int once validated


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Soft prompt: `num_virtual_tokens` learned embeddings in front of the token embeddings."""

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict[str, Any]] = None

    def validate(self) -> None:
        self.prompt_tuning_init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        super().validate()
        if self.prompt_tuning_init not in PROMPT_INIT_MODES:
            raise ConfigError(
                f"prompt_tuning_init must be one of {PROMPT_INIT_MODES}, got {self.prompt_tuning_init!r}."
            )
        if self.prompt_tuning_init == "TEXT":
            if not self.prompt_tuning_init_text:
                raise ConfigError(
                    "prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text whose "
                    "token embeddings start the prompt)."
                )
            if not self.tokenizer_name_or_path:
                raise ConfigError(
                    "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a local tokenizer "
                    "folder or hub id) to turn prompt_tuning_init_text into token ids."
                )
        elif self.tokenizer_kwargs:
            raise ConfigError("tokenizer_kwargs only has an effect with prompt_tuning_init='TEXT'.")


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned keys and values in front of every attention layer's own."""

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}.")

    @property
    def kv_head_dim(self) -> int:
        # Both are set once the config is filled (fill_from_model).
        return cast(int, self.token_dim) // cast(int, self.num_attention_heads)


def fill_from_model(config: PromptLearningConfig, model: Any) -> PromptLearningConfig:
    """A copy of `config` with the model-dependent fields filled in from `model.config` (PEFT's rules;
    prefix tuning counts key/value heads, so grouped-query attention gets the smaller prefix)."""
    hf = getattr(model, "config", None)
    if hf is None:
        missing = [f for f in ("token_dim", "num_layers", "num_attention_heads") if getattr(config, f) is None]
        if missing:
            raise ConfigError(f"{type(config).__name__}: set {missing} for a model without a transformers config.")
        return dataclasses.replace(config, num_transformer_submodules=config.num_transformer_submodules or 1)
    if hasattr(hf, "get_text_config"):
        hf = hf.get_text_config()
    if getattr(hf, _ENCODER_DECODER_HINT, False):
        raise ConfigError(
            f"{type(config).__name__} on encoder-decoder models ({hf.model_type}) is not supported "
            "yet; use a decoder-only or encoder-only model, or LoRA."
        )

    def first(*names: str) -> Optional[int]:
        for n in names:
            value: Optional[int] = getattr(hf, n, None)
            if value is not None:
                return value
        return None

    values: dict[str, Any] = {"num_transformer_submodules": config.num_transformer_submodules or 1}
    values["num_layers"] = config.num_layers or first("num_hidden_layers", "num_layers", "n_layer")
    values["token_dim"] = config.token_dim or first("hidden_size", "n_embd", "d_model")
    values["num_attention_heads"] = config.num_attention_heads or first("num_attention_heads", "n_head", "num_heads")
    for field in ("num_layers", "token_dim", "num_attention_heads"):
        if values[field] is None:
            raise ConfigError(f"{type(config).__name__}: cannot read {field} from {type(hf).__name__}; set it.")
    if isinstance(config, PrefixTuningConfig):
        kv_heads = getattr(hf, "num_key_value_heads", None)
        if kv_heads is not None:
            head_dim = getattr(hf, "head_dim", None) or values["token_dim"] // values["num_attention_heads"]
            values["token_dim"], values["num_attention_heads"] = head_dim * kv_heads, kv_heads
        values["encoder_hidden_size"] = config.encoder_hidden_size or values["token_dim"]
    return dataclasses.replace(config, **values)
