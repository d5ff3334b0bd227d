"""Run a variant eagerly through torch's direct Python bindings instead of `torch.ops.aten` overloads.

A variant graph calls `torch.ops.aten.mul.Tensor(x, y)`. Calling an overload from Python goes through
the JIT operator path (an extra Python frame, then matching arguments against the schema), which costs
about 1 µs more per call than `torch.mul(x, y)` for the same kernel. A decode step is a few hundred
small calls, so that is several percent of it. `eager_forward` generates the variant's code a second
time with each overload in `BINDINGS` replaced by its direct binding and binds it to the variant module
itself, so it reads the same parameters and slot bank at every call. The GraphModule keeps its aten
graph: torch.compile, export and the visualizer see exactly what the passes wrote.

A binding is listed only where it takes the overload's arguments unchanged (same order, same keyword
names); nodes whose keywords the binding does not take keep their overload.
"""

from __future__ import annotations

import copy
import types
from typing import Callable

import torch
from torch import fx
from torch.fx.graph_module import _forward_from_src

aten = torch.ops.aten
Tensor = torch.Tensor

# overload -> (direct binding, keyword arguments it takes like the overload does)
BINDINGS: dict[torch._ops.OpOverload, tuple[Callable, frozenset]] = {
    aten.add.Tensor: (torch.add, frozenset({"alpha"})),
    aten.sub.Tensor: (torch.sub, frozenset({"alpha"})),
    aten.mul.Tensor: (torch.mul, frozenset()),
    aten.div.Tensor: (torch.div, frozenset()),
    aten.neg.default: (torch.neg, frozenset()),
    aten.pow.Tensor_Scalar: (torch.pow, frozenset()),
    aten.rsqrt.default: (torch.rsqrt, frozenset()),
    aten.sin.default: (torch.sin, frozenset()),
    aten.cos.default: (torch.cos, frozenset()),
    aten.tanh.default: (torch.tanh, frozenset()),
    aten.silu.default: (torch._C._nn.silu, frozenset()),
    aten.gelu.default: (torch._C._nn.gelu, frozenset({"approximate"})),
    aten.relu.default: (torch.relu, frozenset()),
    aten.mean.dim: (torch.mean, frozenset({"dtype"})),
    aten.softmax.int: (torch.softmax, frozenset()),
    aten.where.self: (torch.where, frozenset()),
    aten.linear.default: (torch._C._nn.linear, frozenset()),
    aten.addmm.default: (torch.addmm, frozenset({"beta", "alpha"})),
    aten.mm.default: (torch.mm, frozenset()),
    aten.bmm.default: (torch.bmm, frozenset()),
    aten.matmul.default: (torch.matmul, frozenset()),
    aten.embedding.default: (torch.embedding, frozenset()),
    aten.layer_norm.default: (torch.layer_norm, frozenset()),
    aten.scaled_dot_product_attention.default: (
        torch._C._nn.scaled_dot_product_attention,
        frozenset({"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}),
    ),
    aten.cat.default: (torch.cat, frozenset()),
    aten.view.default: (Tensor.view, frozenset()),
    aten.reshape.default: (torch.reshape, frozenset()),
    aten.transpose.int: (torch.transpose, frozenset()),
    aten.permute.default: (torch.permute, frozenset()),
    aten.unsqueeze.default: (torch.unsqueeze, frozenset()),
    aten.select.int: (torch.select, frozenset()),
    aten.t.default: (torch.t, frozenset()),
    aten.expand.default: (Tensor.expand, frozenset()),
    aten.index_copy_.default: (Tensor.index_copy_, frozenset()),
    aten.clone.default: (torch.clone, frozenset({"memory_format"})),
    aten.detach.default: (torch.detach, frozenset()),
}


def lowered_graph(graph: fx.Graph) -> tuple[fx.Graph, int]:
    """A copy of `graph` with every listed overload call replaced by its binding; how many were."""
    lowered = copy.deepcopy(graph)
    count = 0
    for node in lowered.nodes:
        entry = BINDINGS.get(node.target) if node.op == "call_function" else None
        if entry is not None and set(node.kwargs) <= entry[1]:
            node.target = entry[0]
            count += 1
    return lowered, count


def eager_forward(gm: fx.GraphModule) -> Callable:
    """`gm`'s forward over its lowered graph, bound to `gm` (same attributes, same calling convention)."""
    graph, _ = lowered_graph(gm.graph)
    code = graph.python_code(root_module="self")
    return types.MethodType(_forward_from_src(code.src, code.globals), gm)
