"""Fusion: rewrite the LoRA paths the lora pass inserted into fewer, larger kernels; same outputs.

An unmerged adapter's FLOPs are a few percent of its base linear, but each site runs four or five
kernels of its own (dropout, A, B, scale, add). Two rules, each touching only nodes the lora pass made:

shared_input   q/k/v (or gate/up) adapters read one input: one dropout (if any), one matmul over the
               concatenated A matrices, then a view per site.
          x ─┬─ dropout ─ linear(A_q) ─ ...    x ─ dropout ─ linear(cat(A_q, A_k, A_v)) ─┬─ [..., :r_q] ─ ...
             ├─ dropout ─ linear(A_k) ─ ... ⇒                                            ├─ [..., r_q:r_q+r_k] ─ ...
             └─ dropout ─ linear(A_v) ─ ...                                              └─ ...
               In training this draws one dropout mask for the group where PEFT draws one per site:
               each site still sees dropout with probability p (docs/passes.md). Drawing masks is
               the largest single cost the adapters add to a train step on CPU.
fold_scaling   linear(h, B) * s  ⇒  linear(h, B * s): the scale multiplies an r×d_out weight, not the
               tokens×d_out output.

Measured and left out (docs/benchmarks.md): the base projection and A in one GEMM over stacked [W; A]
(the per-call concatenation of W costs more than the kernel it saves), and addmm adding B's product
into the base output (0.3% faster at 512 tokens, 3-5% slower at 1-8 tokens: its views cost more than
the add they save on small inputs).
Weights are never changed: every rule reads the same adapter tensors through the slot bank, so
switching, training and saving are unaffected and gradients reach A and B as before.
"""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import fx

from peftfx.rewrite import ANY, ATTR, Builder, Captures, P, Pass, PassContext, Rule, provenance_of, read_tensor
from peftfx.rewrite.annotations import Provenance

from . import lora

aten = torch.ops.aten
NAME = "fuse"
# provenance of the nodes this pass may rewrite: passes/lora.py's rule "linear" (not "mixed")
LORA_LINEAR = (lora.PASS.name, lora.PASS.rule("linear").name)
_PREFIX_OPS = (aten.to.dtype, aten.dropout.default)  # what the lora pass may put between x and A


def _from_lora(node) -> bool:
    """Whether the lora pass's linear rule made the node (the base graph is never touched)."""
    made = provenance_of(node) if isinstance(node, fx.Node) else None
    return made is not None and (made.pass_name, made.rule) == LORA_LINEAR


def _lora_op(node, ops: tuple) -> bool:
    """A call the lora pass made to one of `ops`."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops and _from_lora(node)


def _adapter(node: fx.Node) -> Optional[str]:
    return cast(Provenance, provenance_of(node)).adapter  # a node the lora pass made


def _holds_tensor(node: fx.Node, ctx: Optional[PassContext] = None) -> bool:
    return read_tensor(node) is not None


def _adapter_linear(node) -> bool:
    """linear(h, W) from the lora pass: no bias, W read by get_attr (A or B of a slot)."""
    return (
        _lora_op(node, (aten.linear.default,))
        and len(node.args) == 2
        and not node.kwargs
        and _holds_tensor(node.args[1])
    )


# -- shared_input ------------------------------------------------------------------------------------


def _a_projection(user: fx.Node, x: fx.Node) -> Optional[tuple[tuple, fx.Node]]:
    """For a user of `x`: (prefix key, A-linear) when it starts a LoRA A path, else None. The prefix
    key names the casts and dropout between x and the linear, which a group must share."""
    prefix, node, feed = [], user, x
    while _lora_op(node, _PREFIX_OPS):
        if len(node.users) != 1:
            return None
        prefix.append((node.target, *node.args[1:]))
        feed, node = node, next(iter(node.users))
    if _adapter_linear(node) and node.args[0] is feed:
        return tuple(prefix), node
    return None


def _groups(x: fx.Node) -> list[tuple[tuple, list[fx.Node]]]:
    found: dict[tuple, list[fx.Node]] = {}
    for user in x.users:
        hit = _a_projection(user, x)
        if hit is not None:
            found.setdefault(hit[0], []).append(hit[1])
    return [(prefix, members) for prefix, members in found.items() if len(members) > 1]


def _shared(x: fx.Node, ctx: PassContext):
    """An input that two or more LoRA A paths with the same prefix read; captures those groups."""
    if len(x.users) < 2:
        return None
    groups = _groups(x)
    return {"groups": groups} if groups else None


def _fuse_shared_input(b: Builder, ctx: PassContext, m: Captures) -> None:
    x = m["node"]
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    for prefix, members in m["groups"]:
        members.sort(key=order.__getitem__)
        first = members[0]
        while first.args[0] is not x:  # the group's nodes go before its first member's prefix
            first = first.args[0]
        b.continue_after(first.prev)
        weights = [b.at(member, _adapter(member)).get_attr(member.args[1].target) for member in members]
        adapters = {_adapter(member) for member in members}
        # the shared nodes are drawn with the first site (not with x's module)
        b.at(members[0], adapters.pop() if len(adapters) == 1 else None)
        h = x
        for op, *args in prefix:
            h = b.call(op, h, *args)
        h = b.call(aten.linear.default, h, b.call(aten.cat.default, weights))
        start = 0
        for member in members:
            rank = cast(torch.Tensor, read_tensor(member.args[1])).shape[0]  # _adapter_linear checked it
            b.replace_uses(member, b.at(member, _adapter(member)).call(aten.slice.Tensor, h, -1, start, start + rank))
            start += rank
            _erase_path(b, member, x)


def _erase_path(b: Builder, node: fx.Node, x: fx.Node) -> None:
    """Remove a replaced A path up to x. Dead-code elimination keeps dropout (it draws random numbers,
    so fx counts it impure), which would still run every call."""
    while node is not x:
        feed = cast(fx.Node, node.args[0])  # the path's input (x or a node of the path)
        b.erase(node)
        node = feed


# -- fold_scaling ------------------------------------------------------------------------------------


def _one_element(node: fx.Node, ctx: PassContext) -> bool:
    tensor = read_tensor(node)
    return tensor is not None and tensor.numel() == 1


# mul(linear(h, B), s) from the lora pass, with s a one-element tensor and the linear used once
_SCALED = P(
    aten.mul.Tensor,
    P(
        aten.linear.default,
        ANY("h"),
        ATTR("weight", where=_holds_tensor),
        name="product",
        nargs=2,
        where=lambda n, ctx: _from_lora(n) and not n.kwargs and len(n.users) == 1,
    ),
    ATTR("scale", where=_one_element),
    nargs=2,
    where=lambda n, ctx: _from_lora(n) and bool(n.users),
)


def _fold_scaling(b: Builder, ctx: PassContext, m: Captures) -> None:
    node = m["node"]
    b.adapter = _adapter(node)
    b.continue_after(node.prev)  # after the scale's get_attr, which the lora pass emits after the product
    folded = b.call(aten.mul.Tensor, m["weight"], m["scale"])
    b.replace_uses(node, b.call(aten.linear.default, m["h"], folded))


PASS = Pass(
    NAME,
    rules=(
        Rule("shared_input", P(op=None, where=_shared), _fuse_shared_input),
        Rule("fold_scaling", _SCALED, _fold_scaling),
    ),
    # only the lora pass's "linear" rule makes what these rules rewrite, and only for bound LoRA adapters
    applies=lambda ctx: ctx.fuse and bool(ctx.positions(lora.NAME)),
)
