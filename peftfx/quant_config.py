"""QuantConfig: which base linears to store in bitsandbytes 4-bit or 8-bit form, and how.

Field names and defaults are transformers' `BitsAndBytesConfig` ones (which PEFT's QLoRA recipes pass
around), so a `BitsAndBytesConfig` can be given wherever a QuantConfig is expected. `bnb_4bit_blocksize`
is peftfx's own (transformers always uses bitsandbytes' default, 64).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .errors import ConfigError, MissingDependencyError

QUANT_TYPES_4BIT = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INSTALL_HINT = "pip install 'bitsandbytes>=0.50' (or pip install 'peftfx[bnb]')"


@dataclass
class QuantConfig:
    """4-bit (QLoRA's NF4/FP4, optional double quantization) or 8-bit (LLM.int8) base linears.

    `llm_int8_skip_modules` (as in transformers, for both widths) names modules kept in full
    precision; by default only the output head is (transformers' choice too).
    """

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: Union[str, torch.dtype, None] = None  # None: the weight's own dtype
    bnb_4bit_blocksize: int = 64
    bnb_4bit_quant_storage: Union[str, torch.dtype] = "uint8"
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: Optional[list[str]] = None
    llm_int8_has_fp16_weight: bool = False

    def __post_init__(self) -> None:
        if self.load_in_4bit == self.load_in_8bit:
            raise ConfigError("QuantConfig needs exactly one of load_in_4bit=True or load_in_8bit=True.")
        if self.bnb_4bit_quant_type not in QUANT_TYPES_4BIT:
            raise ConfigError(
                f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not supported; use one of "
                f"{QUANT_TYPES_4BIT} ('nf4' is QLoRA's)."
            )
        if self.bnb_4bit_blocksize not in BLOCKSIZES:
            raise ConfigError(
                f"bnb_4bit_blocksize={self.bnb_4bit_blocksize} is not supported by bitsandbytes; "
                f"use one of {BLOCKSIZES} (64 is its default)."
            )
        self.bnb_4bit_compute_dtype = _dtype(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype")
        if _dtype(self.bnb_4bit_quant_storage, "bnb_4bit_quant_storage", allow_uint8=True) != torch.uint8:
            raise ConfigError(
                f"bnb_4bit_quant_storage={self.bnb_4bit_quant_storage!r}: peftfx stores packed "
                "weights as uint8 only; drop the option."
            )
        if self.llm_int8_has_fp16_weight:
            raise ConfigError(
                "llm_int8_has_fp16_weight=True (training the 8-bit weights themselves) is not "
                "supported; peftfx trains adapters on a frozen quantized base."
            )
        if isinstance(self.llm_int8_skip_modules, str):
            self.llm_int8_skip_modules = [self.llm_int8_skip_modules]

    @property
    def bits(self) -> int:
        return 4 if self.load_in_4bit else 8

    def skips(self, key: str) -> bool:
        """transformers' rule: a module stays unquantized when a skip name is its path or a path segment."""
        names = self.llm_int8_skip_modules or []
        return any(key == n or key.endswith(f".{n}") or f"{n}." in f"{key}." for n in names)


def as_quant_config(config: Any) -> QuantConfig:
    """A QuantConfig from a QuantConfig, a transformers BitsAndBytesConfig, or a plain dict."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, dict):
        values = dict(config)
    elif hasattr(config, "load_in_4bit") and hasattr(config, "to_dict"):  # transformers.BitsAndBytesConfig
        values = config.to_dict()
    else:
        raise ConfigError(
            f"quantization must be a peftfx.QuantConfig, a transformers.BitsAndBytesConfig or a "
            f"dict; got {type(config).__name__}."
        )
    values.pop("quant_method", None)
    values.pop("llm_int8_enable_fp32_cpu_offload", None)  # device placement, not math
    for private in ("_load_in_4bit", "_load_in_8bit"):
        values.pop(private, None)
    known = {f.name for f in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"quantization options {unknown} are not supported by peftfx; supported: {sorted(known)}.")
    return QuantConfig(**values)


def _dtype(value: Union[str, torch.dtype, None], field: str, allow_uint8: bool = False) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if allow_uint8 and name == "uint8":
        return torch.uint8
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"{field}={value!r} is not a supported dtype; use one of {sorted(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[name]


def require_bitsandbytes():
    """Import bitsandbytes (its import registers the torch.ops.bitsandbytes ops), or say how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MissingDependencyError(
            f"quantized linears need bitsandbytes, which is not installed: {INSTALL_HINT}."
        ) from exc
    return bitsandbytes
