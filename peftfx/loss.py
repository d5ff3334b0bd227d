"""A causal LM's loss computed outside the graph, with the model's own loss function.

transformers' causal LMs compute `self.loss_function(logits=logits, labels=labels,
vocab_size=config.vocab_size, **kwargs)` at the end of `forward`. Captured with labels, that is a second
graph for every call signature that has them (a train step, Trainer's evaluation); so for these models
peftfx captures without labels and calls the same function on the graph's logits: one capture serves
calls with and without labels, and the loss is the one the model computes (same function, same inputs).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

LOSS_INPUTS = ("labels", "num_items_in_batch", "shift_labels")  # what the loss function takes from a call
CAUSAL_LM_LOSS = "ForCausalLMLoss"  # transformers.loss.loss_utils' causal-LM loss


def outside_loss(model: nn.Module) -> Optional[Callable[..., torch.Tensor]]:
    """The model's loss function when its forward computes exactly that on its logits, else None (the
    loss stays in the graph). Models adding an auxiliary loss (MoE router loss) keep theirs inside."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "output_router_logits", False):
        return None
    try:
        function = getattr(model, "loss_function", None)
    except (AttributeError, ValueError):
        return None
    return function if getattr(function, "__name__", None) == CAUSAL_LM_LOSS else None


class WithLoss:
    """Runs a variant without labels, then adds the loss to its output as the model's forward would."""

    def __init__(self, run: Callable[..., Any], loss: Callable[..., torch.Tensor], vocab_size: int, inputs: dict):
        self.run, self.loss, self.vocab_size, self.inputs = run, loss, vocab_size, inputs

    def __call__(self, **named: Any) -> Any:
        out = self.run(**named)
        logits = out["logits"] if not isinstance(out, tuple) else out[0]
        loss = self.loss(logits=logits, vocab_size=self.vocab_size, **self.inputs)
        if isinstance(out, tuple):
            return (loss, *out)
        return type(out)(loss=loss, **out)  # loss first, as the model's own output has it
