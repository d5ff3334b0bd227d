"""Slot banks: one variant graph serves every adapter of the same layout.

A banked method's variant graph does not name adapters: it reads `peftfx_slots.p<i>.<site>.<name>`
(LoRA: `.A`, `.B`, `.scaling`; IA3: `.l`), where position i is the i-th active adapter. Binding points
those attributes at an adapter's tensors (no copy), so switching between adapters of one layout (same
sites, ranks, dropout and dtype) reuses the graph, and under torch.compile the compiled code too:
parameters are graph inputs guarded by shape and dtype, not by identity.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..rewrite.layout import SLOTS, slot_path  # noqa: F401 - the names a slot bank serves
from .store import AdapterStore, module_at


class SlotBank(nn.Module):
    """The attributes a variant graph reads adapter tensors from; `bind` re-points them."""

    def __init__(self) -> None:
        super().__init__()
        self.bound: Optional[tuple] = None  # (adapters, store version) the attributes point at
        self._holders: dict[tuple[int, str], nn.Module] = {}  # (position, site key) -> holder module

    def bind(self, store: AdapterStore, adapters: tuple[str, ...]) -> None:
        # The store version is part of it: an adapter deleted and added again under its name has new tensors.
        if self.bound == (adapters, store.version):
            return
        for position, adapter in enumerate(adapters):
            for key, parameters, buffers in store.site_bindings(adapter):
                holder = self._holders.get((position, key))
                if holder is None:
                    holder = self._holders[(position, key)] = module_at(self, f"p{position}.{key}", create=True)
                holder._parameters.update(parameters)
                holder._buffers.update(buffers)
        self.bound = (adapters, store.version)
