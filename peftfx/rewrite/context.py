"""What every pass is told about the variant it is building.

Plain data plus the shared objects a pass reads tensors from (the adapter store, a quant store). Passes
read these duck-typed: they import nothing from the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import fx

from .annotations import site_of


@dataclass
class PassContext:
    """A variant's inputs: the store, which adapters each pass serves, and the mode."""

    model: Any = None  # the user's nn.Module (passes call its transformers methods, get_input_embeddings)
    store: Any = None  # the AdapterStore (peftfx/state/store.py)
    bound: tuple[str, ...] = ()  # active adapters of banked methods, by slot-bank position (summed in this order)
    saved: tuple[str, ...] = ()  # adapters whose modules_to_save copies are read (first wins)
    mixed: tuple[str, ...] = ()  # mixed batch: a row's index picks one of these (or none)
    row_index: Optional[fx.Node] = None  # the [batch] int64 input holding each row's index
    prompt: tuple[str, ...] = ()  # (prompt-learning adapter, the user's token input: "input_ids" | "inputs_embeds")
    prompt_kind: Optional[str] = None  # its peft_type ("PROMPT_TUNING", "PREFIX_TUNING")
    positions_from_mask: bool = False  # the model counts positions in the attention mask (OPT)
    training: bool = False
    fuse: bool = True  # run passes/fuse.py's rewrites (PeftFxModel.fusion turns them off)
    quant: Any = None  # the QuantStore of a quantized base (passes/quantize.py)
    scratch: dict[str, Any] = field(default_factory=dict)  # per-variant facts a pass computes once

    def method_of(self, adapter: str) -> str:
        """The name of an adapter's method ("lora", "ia3", ...)."""
        return str(self.store.method_of(adapter).name)

    def positions(self, method: str) -> list[tuple[int, str]]:
        """(slot-bank position, adapter) of the bound adapters of one method."""
        return [(i, a) for i, a in enumerate(self.bound) if self.method_of(a) == method]

    def mixed_of(self, method: str) -> list[str]:
        """The mixed batch's adapters of one method (a row's index is its position in `mixed`)."""
        return [a for a in self.mixed if self.method_of(a) == method]

    def sites_of(self, adapter: str) -> dict[str, Any]:
        """site key -> the method's facts about the site, for one adapter."""
        return dict(self.store.sites.get(adapter, {}))

    def serves_prompt(self, kind: str) -> bool:
        """Whether this variant runs a prompt-learning adapter of `kind` ("PROMPT_TUNING", "PREFIX_TUNING")."""
        return bool(self.prompt) and self.prompt_kind == kind

    @property
    def prompt_config(self) -> Any:
        """The config of the variant's prompt-learning adapter."""
        return self.store.configs[self.prompt[0]]


def served_site(method: str, mixed: bool) -> Callable[[fx.Node, PassContext], Optional[dict[str, str]]]:
    """A `where` predicate for a weight method's rule: a site (marked by selection) that one of the
    variant's adapters of `method` adapts (the bound ones, or a mixed batch's); captures its key."""

    def where(node: fx.Node, ctx: PassContext) -> Optional[dict[str, str]]:
        site = site_of(node)
        adapters = ctx.mixed_of(method) if mixed else [a for _, a in ctx.positions(method)]
        if site is None or not any(site.key in ctx.store.sites.get(a, {}) for a in adapters):
            return None
        return {"key": site.key}

    return where
