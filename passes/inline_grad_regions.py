"""Inline no-grad regions: export wraps code under `torch.no_grad()` (transformers' rotary embeddings)
in a `wrap_with_set_grad_enabled(False, submodule, *args)` call. torch.compile breaks the graph at that
call, which splits every compiled variant in two. The region's nodes are copied inline and its outputs
detached, which keeps its meaning: nothing computed there receives gradients.

Before:  out = wrap_with_set_grad_enabled(False, submod_3, positions, inv_freq); cos = out[0]
After:   ...submod_3's nodes...; cos = detach(<its first output>)
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from peftfx.rewrite import Builder, Rule

NAME = "inline_grad_regions"
aten = torch.ops.aten
_HOP = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)


def _is_no_grad_region(node: fx.Node, ctx) -> bool:
    return (_HOP is not None and node.op == "call_function" and node.target is _HOP
            and node.args[0] is False and all(u.target is operator.getitem for u in node.users))


def _inline(node: fx.Node, ctx, b: Builder) -> None:
    gm = b.gm
    submod_node = node.args[1]
    body: fx.GraphModule = getattr(gm, submod_node.target)
    env: dict[fx.Node, fx.Node] = {}
    inputs = iter(node.args[2:])
    outputs = None
    for inner in body.graph.nodes:
        if inner.op == "placeholder":
            env[inner] = next(inputs)
        elif inner.op == "output":
            outputs = inner.args[0]
        else:
            with gm.graph.inserting_before(node):
                if inner.op == "get_attr":
                    raise NotImplementedError("no-grad region reads module state")  # not seen in HF models
                env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for user in list(node.users):
        value = env[outputs[user.args[1]]]
        with gm.graph.inserting_before(user):
            detached = gm.graph.call_function(aten.detach.default, (value,))
        detached.meta.update(user.meta)
        user.replace_all_uses_with(detached)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    if not submod_node.users:
        gm.graph.erase_node(submod_node)
        delattr(gm, submod_node.target)


RULES = (Rule("no_grad", _is_no_grad_region, _inline),)
