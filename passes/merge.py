"""Merge: constant-fold `scaling * B @ A` into the base weight, so the plain base graph runs the adapter.

Folding is done in place under no_grad on the weights the graphs share; unmerging subtracts the same
delta (exact up to fp32 rounding). The fold of a site is its layout rule: (out, in) weights take the
delta as is, GPT-2 Conv1D's (in, out) weights take it transposed (PEFT's fan_in_fan_out).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from peftfx.adapters import AdapterStore, LoraSlot
from peftfx.errors import PeftFxError
from peftfx.quant_store import QuantStore

from .quantize import warn_requantize

NAME = "merge"

# weight layout -> how a (out, in) delta lands on it
FOLD_RULES: dict[bool, Callable[[torch.Tensor], torch.Tensor]] = {
    False: lambda delta: delta,
    True: lambda delta: delta.T,
}


class UnsafeMergeError(PeftFxError, ValueError):
    """safe_merge found NaN or Inf in a merged weight; nothing was changed."""


@torch.no_grad()
def delta_weight(store: AdapterStore, adapter: str, slot: LoraSlot) -> torch.Tensor:
    """The adapter's update in the base weight's layout and dtype (computed in fp32 when it is lower).
    A constant: folding records no autograd history even when the adapter is trainable."""
    a, b = store.lora_weights(adapter, slot.key)
    compute = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    delta = (b.to(compute) @ a.to(compute)) * slot.scaling
    return FOLD_RULES[slot.fan_in_fan_out](delta)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


def merge(model: torch.nn.Module, store: AdapterStore, adapters: Iterable[str], safe_merge: bool = False,
          quant: Optional[QuantStore] = None) -> None:
    """Add each adapter's delta to its base weights. With safe_merge, check every result first.
    A quantized weight (in `quant`) is dequantized, changed and requantized (with a warning)."""
    weights = _weights(model)
    updates = []
    for adapter in adapters:
        for slot in store.lora.get(adapter, {}).values():
            delta = delta_weight(store, adapter, slot)
            if safe_merge:
                merged = _current(weights, quant, slot.weight_path).detach().to(delta.dtype) + delta
                if not torch.isfinite(merged).all():
                    raise UnsafeMergeError(
                        f"merging adapter {adapter!r} into {slot.key!r} gives NaN/Inf; the adapter weights are "
                        "broken (check training), so no weight was changed.")
            updates.append((slot.weight_path, delta))
    _apply_updates(updates, weights, quant, "merging into")


def unmerge(model: torch.nn.Module, store: AdapterStore, adapters: Iterable[str],
            quant: Optional[QuantStore] = None) -> None:
    """Subtract what merge added (in reverse order, so mixed merges unwind exactly; on a quantized base,
    up to the rounding of requantizing)."""
    updates = [(slot.weight_path, -delta_weight(store, adapter, slot))
               for adapter in reversed(list(adapters)) for slot in store.lora.get(adapter, {}).values()]
    _apply_updates(updates, _weights(model), quant, "unmerging from")


def _quantized(quant: Optional[QuantStore], path: str) -> bool:
    return quant is not None and quant.holds(path)


def _current(weights: dict[str, torch.Tensor], quant: Optional[QuantStore], path: str) -> torch.Tensor:
    """The weight as it is now: dequantized when it lives in the quant store."""
    return quant.get(path).dequantize() if _quantized(quant, path) else weights[path]


def _apply_updates(updates: list[tuple[str, torch.Tensor]], weights: dict[str, torch.Tensor],
                   quant: Optional[QuantStore], what: str) -> None:
    """Add each delta in place; quantized weights are summed per path, then requantized once each."""
    quantized: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for path, delta in updates:
            if _quantized(quant, path):
                base = quantized[path] if path in quantized else quant.get(path).dequantize()
                quantized[path] = base + delta.to(base.dtype)
            else:
                weights[path].add_(delta.to(weights[path].dtype))
    if quantized:
        warn_requantize(what)
        for path, merged in quantized.items():
            quant.replace(path, quant.get(path).requantized(merged))
