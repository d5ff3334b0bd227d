"""The state manager: one GraphModule per variant, built lazily from a capture by the pass pipeline.

A variant is (capture, which adapters add LoRA, whose saved modules are read, mixed-batch adapters,
train/eval) plus the store version. All variants read the same base parameters (the capture's) and
the same adapter parameters (the store's), so switching is a dictionary lookup. With nothing active
the variant is the captured base graph itself; a merged adapter needs no LoRA nodes, so a fully merged
model runs the base graph too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import fx

from peftfx.passes import fuse, inline_grad_regions, lora, modules_to_save, prefix, prompt, quantize, simplify
from peftfx.passes.context import PassContext

from .adapters import MOUNT, AdapterStore
from .bindings import eager_forward
from .capture import Capture
from .graph_inputs import add_keyword_input
from .quant_store import QUANT_MOUNT
from .rewrite import run_pass
from .select import annotate
from .slots import SLOTS, SlotBank

# Order matters: modules_to_save retargets base reads before LoRA reads the (possibly copied) inputs.
# Every variant, the base one included, gets its no-grad regions inlined (one compiled graph, no break).
# prompt/prefix rewrite the graph's inputs and attention before any weight-level pass.
# quantize swaps the base linear under LoRA's added path (and finds nothing without a quant store).
# fuse only rewrites the nodes lora inserted, into fewer kernels.
# simplify runs last, on what export recorded (never on inserted nodes): it cannot hide a pattern from the others.
PIPELINE = (inline_grad_regions, prompt, prefix, modules_to_save, lora, quantize, fuse, simplify)
BASE_ROW = "__base__"  # PEFT's name for "no adapter" rows in adapter_names


@dataclass(frozen=True)
class VariantSpec:
    """What a variant graph computes besides the base model."""

    lora: tuple[tuple, ...] = ()  # layouts of the adapters whose LoRA paths run (summed), in order
    saved: tuple[str, ...] = ()  # adapters whose modules_to_save copies are read (first wins)
    mixed: tuple[str, ...] = ()  # mixed batch: adapters a per-row index chooses from
    prompt: tuple = ()  # (prompt-learning adapter, the user's token input name)
    training: bool = False
    row_input: ClassVar[str] = "peftfx_row_adapter"  # the extra keyword input of mixed variants

    @property
    def is_base(self) -> bool:
        return not (self.lora or self.saved or self.mixed or self.prompt)


def build_variant(capture: Capture, model: torch.nn.Module, store: AdapterStore, spec: VariantSpec,
                  bind: tuple[str, ...], quant: Optional[torch.nn.Module] = None, fuse: bool = True) -> fx.GraphModule:
    """A fresh graph from the capture, rewritten by the pipeline; its slot bank bound to `bind`.
    With a quant store (a quantized base), every variant mounts it, the base variant included.
    `fuse=False` leaves the adapter paths as the lora pass wrote them (passes/fuse.py does not run)."""
    gm = capture.fresh_module()
    if quant is not None:
        gm.add_module(QUANT_MOUNT, quant)
    if not spec.is_base:
        gm.add_module(MOUNT, store)
        annotate(gm, model)
    if spec.lora:
        bank = SlotBank()
        bank.bind(store, bind)
        gm.add_module(SLOTS, bank)
    row_index: Optional[fx.Node] = add_keyword_input(gm, spec.row_input) if spec.mixed else None
    ctx = PassContext(model=model, store=store, lora=bind, saved=spec.saved, mixed=spec.mixed,
                      row_index=row_index, prompt=spec.prompt, training=spec.training, quant=quant, fuse=fuse)
    for p in PIPELINE:
        run_pass(gm, p.RULES, ctx, p.NAME)
    gm.recompile()
    return gm


class VariantCache:
    """Variants by key; stale ones (older store versions) are dropped when the store changes.

    `compile_options`, when set, wraps each variant in torch.compile once; a variant serves every
    adapter of its layout through its slot bank, so switching such adapters compiles nothing new.
    Without it a variant runs eagerly through direct torch bindings (peftfx/bindings.py).
    `fusion` says whether variants are built with passes/fuse.py (changing it needs `clear()`); a
    capture can opt out of it when run eagerly (`Capture.fuse_eager`, decode graphs).
    """

    def __init__(self) -> None:
        self._variants: dict[tuple, tuple[fx.GraphModule, Callable]] = {}
        self.compile_options: Optional[dict[str, Any]] = None
        self.quant: Optional[torch.nn.Module] = None  # the model's QuantStore, mounted in every variant
        self.fusion = True

    def get(self, capture: Capture, model: torch.nn.Module, store: AdapterStore, spec: VariantSpec,
            bind: tuple[str, ...] = ()) -> tuple[fx.GraphModule, Callable]:
        """(graph, callable running it) for the spec, with the slot bank pointed at `bind`."""
        version = 0 if spec.is_base else store.version
        key = (id(capture), spec, version)
        entry = self._variants.get(key)
        if entry is None:
            self._variants = {k: v for k, v in self._variants.items() if k[2] in (0, store.version)}
            fuse = self.fusion and (capture.fuse_eager or self.compile_options is not None)
            gm = build_variant(capture, model, store, spec, bind, self.quant, fuse)
            run = torch.compile(gm, **self.compile_options) if self.compile_options is not None else eager_forward(gm)
            entry = self._variants[key] = (gm, run)
        elif spec.lora:
            getattr(entry[0], SLOTS).bind(store, bind)
        return entry

    def specs(self) -> list[VariantSpec]:
        return [key[1] for key in self._variants]

    def clear(self) -> None:
        self._variants.clear()
