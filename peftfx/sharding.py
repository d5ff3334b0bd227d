"""FSDP2's sharded parameters (DTensors), as capture and saving meet them.

`torch.distributed.fsdp.fully_shard` on a model's layers (and root) replaces their parameters by DTensor
shards and gathers them in the layers' forward pre-hooks. peftfx's graphs read parameters at call time
inside those hooks (peftfx/blocks.py); capture and save need the two helpers here.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch


def is_sharded(tensor: Any) -> bool:
    """A DTensor (FSDP2's sharded parameters). torch.distributed.tensor is not imported to find out: no
    DTensor exists before something else imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


@contextlib.contextmanager
def unsharded_placeholders(model: torch.nn.Module):
    """Capture a model FSDP2 has sharded (`fully_shard` on its layers): export cannot trace DTensors, nor
    FSDP2's all-gather hooks on fake tensors. For the capture, each sharded parameter is replaced by an
    uninitialised tensor of its full shape (export only reads shapes and dtypes; on CPU the memory is
    never touched) and FSDP2's forward hooks are taken off; both are put back afterwards. The graphs read
    the real parameters at call time (Capture.owners), inside FSDP2's hooks (peftfx/blocks.py)."""
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if is_sharded(param):
                swapped.append((module._parameters, name, param))
    if not swapped:
        yield
        return
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState  # FSDP2's per-module state

    hooks: list[tuple[dict[int, Any], dict[int, Any]]] = []
    for module in model.modules():
        for found in (module._forward_pre_hooks, module._forward_hooks):
            ours = [key for key, hook in found.items() if isinstance(getattr(hook, "__self__", None), FSDPState)]
            if ours:
                hooks.append((found, dict(found)))
                for key in ours:
                    del found[key]
    for parameters, name, param in swapped:
        empty = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
        parameters[name] = torch.nn.Parameter(empty, requires_grad=param.requires_grad)
    try:
        yield
    finally:
        for parameters, name, param in swapped:
            parameters[name] = param
        for found, saved in hooks:  # the same dictionaries: hook handles and their order stay valid
            found.clear()
            found.update(saved)
