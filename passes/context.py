"""What every pass is told about the variant it is building."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from peftfx.adapters import AdapterStore


@dataclass
class PassContext:
    """A variant's inputs: the store, which adapters each pass serves, and the mode."""

    model: torch.nn.Module
    store: AdapterStore
    lora: tuple[str, ...] = ()  # LoRA paths to add, summed in this order
    saved: tuple[str, ...] = ()  # adapters whose modules_to_save copies are read (first wins)
    mixed: tuple[str, ...] = ()  # mixed batch: a row's index picks one of these (or none)
    row_index: Optional[fx.Node] = None  # the [batch] int64 input holding each row's index
    prompt: tuple = ()  # (prompt-learning adapter, the user's token input: "input_ids" | "inputs_embeds")
    training: bool = False
    fuse: bool = True  # run passes/fuse.py's rewrites (PeftFxModel.fusion turns them off)
    quant: Optional[torch.nn.Module] = None  # the QuantStore of a quantized base (passes/quantize.py)
    scratch: dict = field(default_factory=dict)  # per-variant facts a pass computes once

    def serves_prompt(self, kind: str) -> bool:
        """Whether this variant runs a prompt-learning adapter of `kind` ("PROMPT_TUNING", "PREFIX_TUNING")."""
        return bool(self.prompt) and self.store.kinds.get(self.prompt[0]) == kind

    @property
    def prompt_config(self):
        """The config of the variant's prompt-learning adapter."""
        return self.store.configs[self.prompt[0]]
