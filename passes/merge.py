"""Merge: constant-fold `scaling * B @ A` into the base weight, so the plain base graph runs the adapter.

Folding is done in place under no_grad on the weights the graphs share; unmerging subtracts the same
delta (exact up to fp32 rounding). The fold of a site is its layout rule: (out, in) weights take the
delta as is, GPT-2 Conv1D's (in, out) weights take it transposed (PEFT's fan_in_fan_out).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from peftfx.adapters import AdapterStore, LoraSlot
from peftfx.errors import PeftFxError

NAME = "merge"

# weight layout -> how a (out, in) delta lands on it
FOLD_RULES: dict[bool, Callable[[torch.Tensor], torch.Tensor]] = {
    False: lambda delta: delta,
    True: lambda delta: delta.T,
}


class UnsafeMergeError(PeftFxError, ValueError):
    """safe_merge found NaN or Inf in a merged weight; nothing was changed."""


def delta_weight(store: AdapterStore, adapter: str, slot: LoraSlot) -> torch.Tensor:
    """The adapter's update in the base weight's layout and dtype (computed in fp32 when it is lower)."""
    a, b = store.lora_weights(adapter, slot.key)
    compute = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    delta = (b.to(compute) @ a.to(compute)) * slot.scaling
    return FOLD_RULES[slot.fan_in_fan_out](delta)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


def merge(model: torch.nn.Module, store: AdapterStore, adapters: Iterable[str], safe_merge: bool = False) -> None:
    """Add each adapter's delta to its base weights. With safe_merge, check every result first."""
    weights = _weights(model)
    updates = []
    for adapter in adapters:
        for slot in store.lora.get(adapter, {}).values():
            weight = weights[slot.weight_path]
            delta = delta_weight(store, adapter, slot)
            if safe_merge:
                merged = weight.detach().to(delta.dtype) + delta
                if not torch.isfinite(merged).all():
                    raise UnsafeMergeError(
                        f"merging adapter {adapter!r} into {slot.key!r} gives NaN/Inf; the adapter weights are "
                        "broken (check training), so no weight was changed.")
            updates.append((weight, delta))
    with torch.no_grad():
        for weight, delta in updates:
            weight.add_(delta.to(weight.dtype))


def unmerge(model: torch.nn.Module, store: AdapterStore, adapters: Iterable[str]) -> None:
    """Subtract what merge added (in reverse order, so mixed merges unwind exactly)."""
    weights = _weights(model)
    with torch.no_grad():
        for adapter in reversed(list(adapters)):
            for slot in store.lora.get(adapter, {}).values():
                weight = weights[slot.weight_path]
                weight.sub_(delta_weight(store, adapter, slot).to(weight.dtype))
