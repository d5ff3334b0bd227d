"""What every pass is told about the variant it is building."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from peftfx.adapters import AdapterStore


@dataclass
class PassContext:
    """A variant's inputs: the store, the adapters to activate (in order) and the mode."""

    model: torch.nn.Module
    store: AdapterStore
    active: tuple[str, ...]
    training: bool
    scratch: dict = field(default_factory=dict)  # per-variant facts a pass computes once
