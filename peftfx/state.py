"""The state manager: one GraphModule per variant, built lazily from a capture by the pass pipeline.

A variant is (capture, active adapters, train/eval, store version). All variants read the same base
parameters (the capture's) and the same adapter parameters (the store's), so switching variants is a
dictionary lookup. With no adapter active the variant is the captured base graph itself.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx

from peftfx.passes import lora, modules_to_save
from peftfx.passes.context import PassContext

from .adapters import MOUNT, AdapterStore
from .capture import Capture
from .rewrite import run_pass
from .select import annotate

# Order matters: modules_to_save retargets base reads before LoRA reads the (possibly copied) inputs.
PIPELINE = (modules_to_save, lora)


def build_variant(capture: Capture, model: torch.nn.Module, store: AdapterStore,
                  active: Sequence[str], training: bool) -> fx.GraphModule:
    gm = capture.fresh_module()
    if not active:
        return gm
    gm.add_module(MOUNT, store)
    annotate(gm, model)
    ctx = PassContext(model=model, store=store, active=tuple(active), training=training)
    for p in PIPELINE:
        run_pass(gm, p.RULES, ctx, p.NAME)
    return gm


class VariantCache:
    """Variants by key; stale ones (older store versions) are dropped when the store changes."""

    def __init__(self) -> None:
        self._variants: dict[tuple, fx.GraphModule] = {}

    def get(self, capture: Capture, model: torch.nn.Module, store: AdapterStore,
            active: Sequence[str], training: bool) -> fx.GraphModule:
        key = (id(capture), tuple(active), training, store.version if active else 0)
        gm = self._variants.get(key)
        if gm is None:
            if active:
                self._variants = {k: v for k, v in self._variants.items() if not k[1] or k[3] == store.version}
            gm = build_variant(capture, model, store, active, training)
            self._variants[key] = gm
        return gm

    def clear(self) -> None:
        self._variants.clear()
