"""Activation checkpointing of block calls: transformers' per-layer switches, or a peftfx policy.

transformers marks each layer it checkpoints (`layer.gradient_checkpointing`, set by
`activation_checkpointing_enable` / `gradient_checkpointing_enable`, with `every_n_layers`) and keeps the
checkpoint function with its kwargs on the layer (`layer._gradient_checkpointing_func`: use_reentrant,
CPU offload). A captured graph has dropped those wrappers, so each block call (peftfx/blocks.py) asks
`checkpoint_for` at call time and wraps the block graph in the same function: the switches work before
or after apply, and through Trainer, with no new capture.

`pm.checkpointing(policy=...)` replaces transformers' switches with one of POLICIES. "selective" is
selective activation checkpointing (torch.utils.checkpoint's `create_selective_checkpoint_contexts`):
matmul and attention outputs are saved, the cheap elementwise and norm ops between them are recomputed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .errors import ConfigError

aten = torch.ops.aten

POLICIES = {
    "full": "every layer is recomputed in the backward pass (transformers' gradient checkpointing)",
    "every": "every k-th layer (every=k) is recomputed, the others keep their activations",
    "budget": "a share of the layers, evenly spaced, is recomputed so that about memory_budget of the "
    "activations stay saved (memory_budget=0.25 keeps a quarter)",
    "selective": "matmul and attention outputs are saved, elementwise and norm ops are recomputed",
    "off": "nothing is recomputed, whatever transformers' switches say",
}

# Ops whose outputs selective checkpointing saves (the expensive ones to recompute), as eager dispatch sees them.
SAVED_OPS = frozenset(
    {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten.convolution.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
    }
)


@dataclass
class Checkpointing:
    """The model's checkpointing choice. `policy=None` follows transformers' per-layer switches."""

    policy: Optional[str] = None
    every: int = 1
    memory_budget: Optional[float] = None
    use_reentrant: bool = False
    layers: int = 0  # how many layer blocks the model has (for "budget")

    def set(
        self,
        policy: Optional[str],
        every: Optional[int] = None,
        memory_budget: Optional[float] = None,
        use_reentrant: bool = False,
    ) -> None:
        """Check and take a policy (nothing changes when it is refused)."""
        if policy is not None and policy not in POLICIES:
            options = "; ".join(f"{name!r}: {meaning}" for name, meaning in POLICIES.items())
            raise ConfigError(f"checkpointing policy {policy!r} is not known. Use one of {options}; or None.")
        if every is not None and (policy != "every" or not isinstance(every, int) or every < 1):
            raise ConfigError(f"every={every!r} goes with policy='every' and must be a positive int.")
        if memory_budget is not None:
            if policy != "budget" or not isinstance(memory_budget, (int, float)) or not 0 <= memory_budget <= 1:
                raise ConfigError(
                    f"memory_budget={memory_budget!r} goes with policy='budget' and must be within [0, 1] "
                    "(the share of activations kept)."
                )
        if policy == "budget" and memory_budget is None:
            raise ConfigError("policy='budget' needs memory_budget=, the share of activations kept (0 to 1).")
        if use_reentrant and policy == "selective":
            raise ConfigError("policy='selective' runs non-reentrant checkpointing; use use_reentrant=False.")
        self.policy, self.every, self.memory_budget, self.use_reentrant = (
            policy,
            every or 1,
            memory_budget,
            use_reentrant,
        )

    def wanted(self, model: nn.Module) -> bool:
        """Whether anything asks for checkpointing now: a policy, or transformers' switch on some layer."""
        if self.policy is not None:
            return self.policy != "off"
        return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())

    def recomputes(self, index: int) -> bool:
        """Whether layer `index` is recomputed under "every" or "budget"."""
        if self.policy == "every":
            return index % self.every == 0
        share = 1.0 - float(self.memory_budget or 0.0)  # of the layers to recompute
        count = round(share * self.layers)
        if count <= 0:
            return False
        step = self.layers / count
        return any(int(k * step) == index for k in range(count))


def checkpoint_for(
    layer: nn.Module, settings: Checkpointing, training: bool, index: Optional[int]
) -> Optional[Callable[..., Any]]:
    """The function a block call runs its graph through (`wrap(run, *args)`), or None to run it plainly."""
    if not training or not torch.is_grad_enabled():
        return None
    policy = settings.policy
    if policy is None:
        if not getattr(layer, "gradient_checkpointing", False) or not layer.training:
            return None
        func = getattr(layer, "_gradient_checkpointing_func", None)
        return func if callable(func) else functools.partial(checkpoint, use_reentrant=False)
    if policy == "off" or index is None:
        return None
    if policy == "selective":
        return functools.partial(checkpoint, use_reentrant=False, context_fn=_selective_contexts)
    if policy in ("every", "budget") and not settings.recomputes(index):
        return None
    return functools.partial(checkpoint, use_reentrant=settings.use_reentrant)


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> Any:
    return create_selective_checkpoint_contexts(_save_matmuls)
