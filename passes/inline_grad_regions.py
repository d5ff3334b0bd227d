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

from peftfx.rewrite import Builder, Captures, P, Pass, PassContext, Rule

NAME = "inline_grad_regions"
aten = torch.ops.aten
_HOP = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)

# wrap_with_set_grad_enabled(False, submodule, *args) whose every user picks one of its outputs
_NO_GRAD_REGION = P(_HOP, False, where=lambda node, ctx: all(u.target is operator.getitem for u in node.users))


def _validate(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Regions reading module state (get_attr inside the body) are not inlined: refuse them (not seen in
    HF models, whose no-grad regions take their buffers as inputs)."""
    for node in gm.graph.nodes:
        if node.target is _HOP and _NO_GRAD_REGION.match(node, ctx) is not None:
            body: fx.GraphModule = getattr(gm, node.args[1].target)
            reads = [str(inner.target) for inner in body.graph.nodes if inner.op == "get_attr"]
            if reads:
                raise NotImplementedError(f"no-grad region reads module state: {node.args[1].target} reads {reads}")


def _inline(b: Builder, ctx: PassContext, m: Captures) -> None:
    node = m["node"]
    submod_node = node.args[1]
    body: fx.GraphModule = getattr(b.gm, submod_node.target)
    env: dict[fx.Node, fx.Node] = {}
    inputs = iter(node.args[2:])
    outputs = None
    b.insert_before(node)
    for inner in body.graph.nodes:
        if inner.op == "placeholder":
            env[inner] = next(inputs)
        elif inner.op == "output":
            outputs = inner.args[0]
        else:
            env[inner] = b.copy(inner, lambda n: env[n])
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for user in list(node.users):
        value = env[outputs[user.args[1]]]
        b.insert_before(user)
        detached = b.take_meta(b.call(aten.detach.default, value), user)  # stands in for the getitem
        b.replace_uses(user, detached)
        b.erase(user)
    b.erase(node)
    if not submod_node.users:
        b.erase(submod_node)
        b.drop_submodule(submod_node.target)


PASS = Pass(
    NAME,
    rules=(Rule("no_grad", _NO_GRAD_REGION, _inline),),
    applies=lambda ctx: _HOP is not None,
    validate=_validate,
    provenance=False,  # restructures what export recorded: the drawn graph shows the model's own nodes
)
