"""Variant graphs: one GraphModule per variant, built lazily from a capture by the pass pipeline.

A variant is (capture, the layouts of the banked adapters that run, whose saved modules are read,
mixed-batch adapters, a prompt-learning adapter, train/eval) plus the generations of the adapters its
graph names. All variants read the same base parameters (the capture's) and the same adapter tensors
(the store's), so switching is a dictionary lookup. With nothing active the variant is the captured
base graph itself; merged adapters need no nodes, so a fully merged model runs the base graph too.
Which spec runs now is decided by peftfx/state/model_state.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import fx

from peftfx.passes import fuse, inline_grad_regions, modules_to_save, quantize, simplify

from .. import blocks, code_cache
from ..bindings import eager_forward
from ..blocks import BlockCall
from ..capture import Capture
from ..checkpointing import Checkpointing
from ..methods import METHODS
from ..regional import BlockCompiler
from ..rewrite import MOUNT, QUANT_MOUNT, SLOTS, PassContext, run_pass
from ..rewrite.graph_inputs import add_keyword_input
from ..select import annotate
from ..virtual_tokens import positions_from_mask
from .slots import SlotBank
from .store import AdapterStore


def _pipeline() -> tuple:
    """Order matters. Every variant, the base one included, gets its no-grad regions inlined (one
    compiled graph, no break). Methods of the "inputs" stage (prompt, prefix) rewrite the graph's inputs
    and attention before any weight-level pass. modules_to_save retargets base reads before the
    "weights" methods (LoRA, IA3, ...) read the (possibly copied) inputs. quantize swaps the base linear
    under the adapter paths (and finds nothing without a quant store). fuse only rewrites the nodes lora
    inserted, into fewer kernels. simplify runs last, on what export recorded (never on inserted nodes):
    it cannot hide a pattern from the others."""
    stage = {name: [p for m in METHODS if m.stage == name for p in m.passes] for name in ("inputs", "weights")}
    return (
        inline_grad_regions.PASS,
        *stage["inputs"],
        modules_to_save.PASS,
        *stage["weights"],
        quantize.PASS,
        fuse.PASS,
        simplify.PASS,
    )


PIPELINE = _pipeline()
BASE_ROW = "__base__"  # PEFT's name for "no adapter" rows in adapter_names


@dataclass(frozen=True)
class VariantSpec:
    """What a variant graph computes besides the base model."""

    lora: tuple[tuple, ...] = ()  # layouts of the banked adapters that run (summed), by slot position
    saved: tuple[str, ...] = ()  # adapters whose modules_to_save copies are read (first wins)
    mixed: tuple[str, ...] = ()  # mixed batch: adapters a per-row index chooses from
    prompt: tuple[str, ...] = ()  # (prompt-learning adapter, the user's token input name)
    training: bool = False
    row_input: ClassVar[str] = "peftfx_row_adapter"  # the extra keyword input of mixed variants

    @property
    def is_base(self) -> bool:
        return not (self.lora or self.saved or self.mixed or self.prompt)


def prepare_variant(
    capture: Capture,
    model: torch.nn.Module,
    store: AdapterStore,
    spec: VariantSpec,
    bind: tuple[str, ...],
    quant: Optional[torch.nn.Module] = None,
    fuse: bool = True,
) -> tuple[fx.GraphModule, PassContext]:
    """A fresh graph from the capture with the stores mounted and its slot bank bound to `bind`, and
    the context the pipeline runs with (tests/passes runs single passes on it). With a quant store (a
    quantized base), every variant mounts it, the base variant included."""
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
    ctx = PassContext(
        model=model,
        store=store,
        bound=bind,
        saved=spec.saved,
        mixed=spec.mixed,
        row_index=row_index,
        prompt=spec.prompt,
        training=spec.training,
        quant=quant,
        fuse=fuse,
        prompt_kind=store.kinds.get(spec.prompt[0]) if spec.prompt else None,
        positions_from_mask=positions_from_mask(model),
    )
    return gm, ctx


def build_variant(
    capture: Capture,
    model: torch.nn.Module,
    store: AdapterStore,
    spec: VariantSpec,
    bind: tuple[str, ...],
    quant: Optional[torch.nn.Module] = None,
    fuse: bool = True,
) -> fx.GraphModule:
    """A fresh graph from the capture, rewritten by the pipeline. `fuse=False` leaves the adapter paths
    as the lora pass wrote them (passes/fuse.py does not run)."""
    gm, ctx = prepare_variant(capture, model, store, spec, bind, quant, fuse)
    for graph_pass in PIPELINE:
        run_pass(gm, graph_pass, ctx)
    gm.recompile()
    return gm


MIXED_VARIANT_LIMIT = 16  # mixed-batch variants kept (least recently used dropped): one per adapter set


class VariantCache:
    """Variants by key; a store change drops only the variants it made stale.

    A variant is keyed by its capture, its spec and the *generations* of the adapters the graph names
    (its saved modules, a mixed batch's adapters, a prompt adapter): adding or deleting another adapter
    changes none of those, so it rebuilds nothing. LoRA-only variants name no adapter (slot banks) and are
    dropped once no adapter of their layout is left. Mixed-batch variants, one per adapter set, are kept
    for the `mixed_limit` most recently used sets. A dropped graph's generated source is released from
    torch.fx's global cache (peftfx/code_cache.py).

    `compile_options`, when set, compiles each block structure once (peftfx/regional.py: regional
    compilation; decode graphs, which run flat, are compiled whole); a variant serves every adapter of
    its layout through its slot bank, so switching such adapters compiles nothing new.
    Without it a variant runs eagerly through direct torch bindings (peftfx/bindings.py).
    `fusion` says whether variants are built with passes/fuse.py (changing it needs `clear()`); a
    capture can opt out of it when run eagerly (`Capture.fuse_eager`, decode graphs).
    """

    def __init__(self, mixed_limit: int = MIXED_VARIANT_LIMIT) -> None:
        self._variants: OrderedDict[tuple, tuple[fx.GraphModule, Callable]] = OrderedDict()
        self._code: dict[tuple, list[str]] = {}  # key -> torch.fx source-cache keys its graphs made
        self._checked_version: Optional[int] = None
        self.mixed_limit = mixed_limit
        self.compile_options: Optional[dict[str, Any]] = None
        self.quant: Optional[torch.nn.Module] = None  # the model's QuantStore, mounted in every variant
        self.fusion = True
        self.checkpointing = Checkpointing()  # read by block calls at call time (peftfx/checkpointing.py)
        self._blocks: dict[tuple, dict[str, BlockCall]] = {}  # key -> its run's block calls by module path
        self._block_compiler: Optional[BlockCompiler] = None  # pm.compile()'s functions per block structure

    def get(
        self,
        capture: Capture,
        model: torch.nn.Module,
        store: AdapterStore,
        spec: VariantSpec,
        bind: tuple[str, ...] = (),
    ) -> tuple[fx.GraphModule, Callable]:
        """(graph, callable running it) for the spec, with the slot bank pointed at `bind`."""
        if self._checked_version != store.version:
            self._drop_stale(store)
        key = (id(capture), spec, _generations(store, spec))
        entry = self._variants.get(key)
        if entry is None:
            fuse = self.fusion and (capture.fuse_eager or self.compile_options is not None)
            start = code_cache.next_key()
            gm = build_variant(capture, model, store, spec, bind, self.quant, fuse)
            if capture.blocks:
                compiler = self._compiler()
                run, self._blocks[key] = blocks.lower(
                    gm, model, capture.owners, self.checkpointing, spec.training, compiler
                )
            elif self.compile_options is not None:  # a decode graph: compiled whole
                run = torch.compile(gm, **self.compile_options)
            else:
                run = eager_forward(gm, owners=capture.owners)
            entry = self._variants[key] = (gm, run)
            self._code[key] = code_cache.made_since(start)
            if spec.mixed:
                self._bound_mixed()
        else:
            if spec.mixed:
                self._variants.move_to_end(key)
            if spec.lora:
                getattr(entry[0], SLOTS).bind(store, bind)
        return entry

    def _compiler(self) -> Optional[BlockCompiler]:
        """The block compiler of the current compile options (one per options: a new pm.compile() call
        starts afresh), or None when variants run eagerly."""
        if self.compile_options is None:
            self._block_compiler = None
        elif self._block_compiler is None or self._block_compiler.options != self.compile_options:
            self._block_compiler = BlockCompiler(self.compile_options)
        return self._block_compiler

    def _drop_stale(self, store: AdapterStore) -> None:
        """Drop variants naming an adapter that is gone (or was added anew) or a layout no adapter has."""
        layouts = {store.layout(a) for a in store.sites}
        for key in list(self._variants):
            spec = key[1]
            if key[2] != _generations(store, spec) or any(layout not in layouts for layout in spec.lora):
                self._drop(key)
        self._checked_version = store.version

    def _bound_mixed(self) -> None:
        mixed = [key for key in self._variants if key[1].mixed]
        for key in mixed[: max(0, len(mixed) - self.mixed_limit)]:
            self._drop(key)

    def _drop(self, key: tuple) -> None:
        del self._variants[key]
        self._blocks.pop(key, None)
        code_cache.release(self._code.pop(key, []))

    def specs(self) -> list[VariantSpec]:
        return [key[1] for key in self._variants]

    def block_calls(self, gm: fx.GraphModule) -> dict[str, BlockCall]:
        """The block calls that run the variant `gm` (empty when it runs flat: compiled, or a decode graph)."""
        for key, entry in self._variants.items():
            if entry[0] is gm:
                return dict(self._blocks.get(key, {}))
        return {}

    def graphs(self) -> list[tuple[VariantSpec, fx.GraphModule]]:
        return [(key[1], entry[0]) for key, entry in self._variants.items()]

    def clear(self) -> None:
        for key in list(self._variants):
            self._drop(key)
        self._checked_version = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies (copy.deepcopy, pickle) keep the options and rebuild graphs on first use: a graph holds
        the original's tensors, so a copied one would run the original's weights."""
        state = self.__dict__.copy()
        state.update(_variants=OrderedDict(), _code={}, _blocks={}, _checked_version=None, _block_compiler=None)
        return state


def _generations(store: AdapterStore, spec: VariantSpec) -> tuple:
    """The generation of each adapter a variant's graph reads by name (None for one that is gone)."""
    names = spec.saved + spec.mixed + spec.prompt[:1]
    return tuple(store.generation.get(name) for name in names)
