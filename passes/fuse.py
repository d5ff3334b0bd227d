"""Fusion: rewrite the LoRA paths the lora pass inserted into fewer, larger kernels; same outputs.

An unmerged adapter's FLOPs are a few percent of its base linear, but each site runs four or five
kernels of its own (dropout, A, B, scale, add). Two rules, each touching only nodes the lora pass made:

shared_input   q/k/v (or gate/up) adapters read one input: one dropout (if any), one matmul over the
               concatenated A matrices, then a view per site.
                 x ─┬─ dropout ─ linear(A_q) ─ ...        x ─ dropout ─ linear(cat(A_q, A_k, A_v)) ─┬─ [..., :r_q] ─ ...
                    ├─ dropout ─ linear(A_k) ─ ...   ⇒                                              ├─ [..., r_q:r_q+r_k] ─ ...
                    └─ dropout ─ linear(A_v) ─ ...                                                  └─ ...
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

from typing import Optional

import torch
from torch import fx

from peftfx.rewrite import Builder, Rule, read_tensor
from peftfx.select import META_KEY

from .context import PassContext

aten = torch.ops.aten
NAME = "fuse"
LORA_PASS = "lora.linear"  # provenance of the nodes this pass may rewrite (passes/lora.py, rule "linear")
_PREFIX_OPS = (aten.to.dtype, aten.dropout.default)  # what the lora pass may put between x and A


def _lora_op(node, ops: tuple) -> bool:
    """A call the lora pass made (the base graph is never touched) to one of `ops`."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops
            and node.meta.get(META_KEY, {}).get("pass") == LORA_PASS)


def _adapter_linear(node) -> bool:
    """linear(h, W) from the lora pass: no bias, W read by get_attr (A or B of a slot)."""
    return (_lora_op(node, (aten.linear.default,)) and len(node.args) == 2 and not node.kwargs
            and read_tensor(node.args[1]) is not None)


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


def _shares_input(node: fx.Node, ctx: PassContext) -> bool:
    return ctx.fuse and len(node.users) > 1 and bool(_groups(node))


def _fuse_shared_input(x: fx.Node, ctx: PassContext, b: Builder) -> None:
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    for prefix, members in _groups(x):
        members.sort(key=order.__getitem__)
        first = members[0]
        while first.args[0] is not x:  # the group's nodes go before its first member's prefix
            first = first.args[0]
        b.continue_after(first.prev)
        weights = [_as_member(b, m).get_attr(m.args[1].target) for m in members]
        _as_member(b, members[0])  # the shared nodes are drawn with the first site (not with x's module)
        adapters = {m.meta[META_KEY].get("adapter") for m in members}
        b.adapter = adapters.pop() if len(adapters) == 1 else None
        h = x
        for op, *args in prefix:
            h = b.call(op, h, *args)
        h = b.call(aten.linear.default, h, b.call(aten.cat.default, weights))
        start = 0
        for member in members:
            rank = read_tensor(member.args[1]).shape[0]
            member.replace_all_uses_with(_as_member(b, member).call(aten.slice.Tensor, h, -1, start, start + rank))
            start += rank
            _erase_path(member, x)


def _as_member(b: Builder, member: fx.Node) -> Builder:
    """Point the builder's metadata (module path, adapter) at one site of the group."""
    b.anchor = member
    b.adapter = member.meta[META_KEY].get("adapter")
    return b


def _erase_path(node: fx.Node, x: fx.Node) -> None:
    """Remove a replaced A path up to x. Dead-code elimination keeps dropout (it draws random numbers,
    so fx counts it impure), which would still run every call."""
    while node is not x:
        feed = node.args[0]
        x.graph.erase_node(node)
        node = feed


# -- fold_scaling ------------------------------------------------------------------------------------


def _scaled(node: fx.Node) -> bool:
    """mul(linear(h, B), s) from the lora pass, with s a one-element tensor and the linear used once."""
    if not _lora_op(node, (aten.mul.Tensor,)):
        return False
    product, scale = node.args
    scale_tensor = read_tensor(scale)
    return (_adapter_linear(product) and len(product.users) == 1 and scale_tensor is not None
            and scale_tensor.numel() == 1)


def _folds(node: fx.Node, ctx: PassContext) -> bool:
    return ctx.fuse and bool(node.users) and _scaled(node)


def _fold_scaling(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    product, scale = node.args
    h, weight = product.args
    b.adapter = node.meta[META_KEY].get("adapter")
    b.continue_after(node.prev)  # after the scale's get_attr, which the lora pass emits after the product
    folded = b.call(aten.mul.Tensor, weight, scale)
    b.replace_uses(node, b.call(aten.linear.default, h, folded))


RULES = (
    Rule("shared_input", _shares_input, _fuse_shared_input),
    Rule("fold_scaling", _folds, _fold_scaling),
)
