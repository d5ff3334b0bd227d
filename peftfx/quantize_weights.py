"""The weight side of quantization: pack a model's base linears once, give them back, and the checks.

`quantize_model` packs each targeted weight with bitsandbytes into the quant store and hollows the
full-precision parameter; passes/quantize.py then rewrites every variant graph to read the packed weight
(the graph side, like merge's two halves). `dequantize_into_model` undoes it.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .errors import ConfigError, TargetNotFoundError
from .quant_config import QuantConfig, as_quant_config, require_bitsandbytes
from .quant_store import QuantStore, Weight4bit, Weight8bit, hollow, storage_bytes
from .select import linear_sites, output_head_path

MAX_NUMEL = 2**31 - 1  # bitsandbytes' kernels index packed weights with 32-bit integers


@dataclass(frozen=True)
class QuantReport:
    """What quantize_model did: how many linears, and the bytes of their weights before and after."""

    bits: int
    linears: int
    bytes_before: int
    bytes_after: int
    skipped: tuple[str, ...]  # linear weights left in full precision (head, skip list, shared weights)

    def __str__(self) -> str:
        ratio = self.bytes_before / max(self.bytes_after, 1)
        return (
            f"quantized {self.linears} linears to {self.bits}-bit: weights {self.bytes_before:,d} -> "
            f"{self.bytes_after:,d} bytes ({ratio:.1f}x smaller); kept in full precision: "
            f"{list(self.skipped)}"
        )


def check_quantizable(key: str, weight: torch.Tensor, config: QuantConfig) -> None:
    """Refuse weights bitsandbytes cannot pack (the ragged last block of any 2-D weight is padded)."""
    if weight.dim() != 2 or weight.numel() == 0:
        raise ConfigError(
            f"layer {key!r}: weight of shape {tuple(weight.shape)} cannot be quantized (bitsandbytes "
            "packs non-empty 2-D weights only); add it to llm_int8_skip_modules."
        )
    if weight.numel() > MAX_NUMEL:
        raise ConfigError(
            f"layer {key!r}: weight of shape {tuple(weight.shape)} has {weight.numel():,d} elements, "
            f"more than bitsandbytes' kernels index ({MAX_NUMEL:,d}) with bnb_4bit_blocksize="
            f"{config.bnb_4bit_blocksize}; add it to llm_int8_skip_modules."
        )
    if not weight.dtype.is_floating_point:
        raise ConfigError(f"layer {key!r}: weight dtype {weight.dtype} is not a float; it is already quantized?")


def quantize_model(
    gm: fx.GraphModule, model: torch.nn.Module, config: Any, keep: tuple[str, ...] = ()
) -> tuple[QuantStore, QuantReport]:
    """Pack the weight of every `aten.linear` in `gm` (a capture of `model`) but the output head, the skip
    list and `keep` (module paths), and hollow the full-precision parameters in place.

    The parameters keep their identity (`.data` is swapped), so captures made earlier still read them,
    and the quant store finds them by identity. GPT-2 Conv1D (`addmm`) weights are left alone.
    """
    require_bitsandbytes()
    config = as_quant_config(config)
    head = output_head_path(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    uses = Counter(id(p) for p in params.values())
    store, skipped, planned = QuantStore(config), [], {}
    for site in linear_sites(gm, model):
        if site.fan_in_fan_out or site.weight_path in planned:
            continue
        weight = params[site.weight_path]
        if (
            site.key == head
            or config.skips(site.key)
            or uses[id(weight)] > 1
            or any(site.key == k or site.key.startswith(f"{k}.") for k in keep)
        ):
            skipped.append(site.key)
            continue
        check_quantizable(site.key, weight, config)
        planned[site.weight_path] = weight
    if not planned:
        raise TargetNotFoundError(
            f"no linear of {type(model).__name__} is left to quantize (output head and "
            f"llm_int8_skip_modules={config.llm_int8_skip_modules} excluded: {skipped})."
        )
    kind = Weight4bit if config.load_in_4bit else Weight8bit
    before = 0
    for path, weight in planned.items():
        before += storage_bytes([weight])
        packed = kind.quantize(weight, config)
        with torch.no_grad():
            weight.data = hollow(weight)
        weight.requires_grad_(False)
        store.add(path, weight, packed)
    store.bytes_before = before
    return store, QuantReport(config.bits, len(planned), before, store.nbytes(), tuple(dict.fromkeys(skipped)))


def dequantize_into_model(model: torch.nn.Module, store: QuantStore) -> None:
    """Give every hollow parameter its full-precision weight back (dequantized), emptying the store."""
    params = {path: p for path, p in model.named_parameters(remove_duplicate=False)}
    for path, packed in list(store.items()):
        with torch.no_grad():
            params[path].data = packed.dequantize(packed.dtype)
        store.remove(path)


def warn_requantize(what: str) -> None:
    warnings.warn(
        f"{what} a quantized base: each weight is dequantized, changed and quantized again, so rounding "
        "changes outputs slightly (merge_and_unload(dequantize=True) merges in full precision).",
        stacklevel=3,
    )
