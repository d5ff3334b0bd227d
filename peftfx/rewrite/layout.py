"""Names shared by the engine and the passes: where a variant graph finds adapter tensors, and how
to read a linear op's operands.

A variant GraphModule mounts the adapter store as `peftfx`, a LoRA variant's slot bank as
`peftfx_slots` and a quantized base's packed weights as `peftfx_quant`; passes emit get_attr nodes with
these prefixes and the engine mounts the modules under them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import fx

aten = torch.ops.aten

MOUNT = "peftfx"  # the adapter store inside each variant GraphModule
SLOTS = "peftfx_slots"  # a variant's slot bank (peftfx/state/slots.py)
QUANT_MOUNT = "peftfx_quant"  # a quantized base's packed weights (peftfx/quant_store.py)


def slot_path(position: int, key: str, which: str) -> str:
    """The attribute a LoRA variant reads the `position`-th active adapter's A, B or scaling from."""
    return f"{SLOTS}.p{position}.{key}.{which}"


def store_path(path: str) -> str:
    """A get_attr target reading `path` of the adapter store."""
    return f"{MOUNT}.{path}"


LinearParts = tuple[Any, Any, Any, bool]


def _linear_parts(node: fx.Node) -> Optional[LinearParts]:
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return x, weight, bias, False


def _addmm_parts(node: fx.Node) -> Optional[LinearParts]:
    bias, x, weight = node.args[0], node.args[1], node.args[2]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    return x, weight, bias, True


# op -> how to read (input, weight, bias, weight-is-(in,out)) from its node: nn.Linear and F.linear,
# and GPT-2's Conv1D (addmm with an (in, out) weight)
LINEAR_OPS: dict[Callable[..., Any], Callable[[fx.Node], Optional[LinearParts]]] = {
    aten.linear.default: _linear_parts,
    aten.addmm.default: _addmm_parts,
}
