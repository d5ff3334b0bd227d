"""Activation bytes of one training step: what the forward leaves alive for the backward.

A TorchDispatchMode notes the storage of every tensor an op makes during the forward; once the forward
has returned (and Python's garbage is collected), the storages still alive are what autograd keeps for
the backward, the checkpoints' saved inputs and selective checkpointing's saved outputs included, plus
the step's own outputs (logits, loss). Parameters are not op outputs, so they are not counted. The same
count for peftfx and PEFT makes their ratio fair; it is not the process's peak memory
(tools/bench/memory.py).
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Made(TorchDispatchMode):
    """Weak references to the storages of the tensors ops return."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[tuple[StorageWeakRef, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not torch._subclasses.fake_tensor.is_fake(leaf):
                try:
                    storage = leaf.untyped_storage()
                    self.storages.append((StorageWeakRef(storage), storage.nbytes()))
                except (RuntimeError, NotImplementedError):  # a tensor without storage (functional, meta)
                    continue
        return out


def saved_activation_bytes(step: Callable[[], torch.Tensor], *_: Any) -> int:
    """Bytes the forward `step()` (returning a loss) leaves alive, then runs that loss's backward.

    Run one step before measuring: a step that captures a graph traces inside the mode."""
    made = _Made()
    with made:
        loss = step()
    gc.collect()
    alive = sum({ref.cdata: nbytes for ref, nbytes in made.storages if not ref.expired()}.values())
    loss.backward()
    return alive
