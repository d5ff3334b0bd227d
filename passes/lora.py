"""LoRA: after each targeted linear op add `scaling * B(A(dropout(x)))`, per active adapter.

Before:  y = linear(x, W, b)                 (or addmm(b, x, W) for GPT-2's Conv1D)
After:   y = linear(x, W, b)
         h = linear(linear(dropout(x), A), B)   # dropout only in train mode, only if p > 0
         y' = y + h * scaling                   # users of y now read y'

Mixed batches (one adapter per row) use one path for all adapters: the adapters' A and B are padded to
a common rank and stacked (scaling folded into B, a zero slot for rows without adapter), each row's
pair is gathered by the row-index input, and two batched matmuls apply them.
"""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import fx

from peftfx.rewrite import (
    LINEAR_OPS,
    Builder,
    Captures,
    P,
    Pass,
    PassContext,
    Rule,
    served_site,
    slot_path,
    store_path,
)
from peftfx.rewrite.layout import LinearParts

aten = torch.ops.aten
NAME = "lora"


def _weight(b: Builder, ctx: PassContext, adapter: str, key: str, which: str) -> fx.Node:
    return b.get_attr(store_path(ctx.store.site_tensor_path(adapter, key, which)))


def _insert_lora(b: Builder, ctx: PassContext, m: Captures) -> None:
    """Add each active adapter's path, reading its tensors from the variant's slot bank (position i =
    i-th active adapter), so the graph is the same for every adapter of the same layout."""
    node, key = m["node"], m["key"]
    x = cast(LinearParts, LINEAR_OPS[node.target](node))[0]  # selection marks only sites it could read
    out_dtype = node.meta["val"].dtype if "val" in node.meta else None
    out = node
    for position, adapter in ctx.positions(NAME):
        slot = ctx.store.sites.get(adapter, {}).get(key)
        if slot is None:
            continue
        b.adapter = adapter
        a_weight = ctx.store.site_tensor(adapter, key, "A")
        recast = out_dtype is not None and a_weight.dtype != out_dtype
        h = b.call(aten.to.dtype, x, a_weight.dtype) if recast else x
        if ctx.training and slot.dropout > 0:
            h = b.call(aten.dropout.default, h, slot.dropout, True)
        h = b.call(aten.linear.default, h, b.get_attr(slot_path(position, key, "A")))
        h = b.call(aten.linear.default, h, b.get_attr(slot_path(position, key, "B")))
        h = b.call(aten.mul.Tensor, h, b.get_attr(slot_path(position, key, "scaling")))
        if recast:
            h = b.call(aten.to.dtype, h, out_dtype)
        out = b.call(aten.add.Tensor, out, h)
    b.replace_uses(node, out)


def _insert_mixed(b: Builder, ctx: PassContext, m: Captures) -> None:
    node, key = m["node"], m["key"]
    x = cast(LinearParts, LINEAR_OPS[node.target](node))[0]
    slots = {a: ctx.store.sites[a][key] for a in ctx.mixed_of(NAME) if key in ctx.store.sites.get(a, {})}
    rank = max(s.r for s in slots.values())
    first = next(iter(slots.values()))
    dtype = ctx.store.site_tensor(next(iter(slots)), key, "A").dtype  # the adapters' math runs in it
    out_dtype = node.meta["val"].dtype if "val" in node.meta else dtype
    stacked_a: list[Optional[fx.Node]] = []  # None: the adapter has no slot here (zeros below)
    stacked_b: list[Optional[fx.Node]] = []
    for adapter in ctx.mixed:
        slot = slots.get(adapter)
        if slot is None:
            stacked_a.append(None)
            stacked_b.append(None)
            continue
        b.adapter = adapter
        a = _weight(b, ctx, adapter, key, "A")
        w = _weight(b, ctx, adapter, key, "B")
        if ctx.store.site_tensor(adapter, key, "A").dtype != dtype:
            a, w = b.call(aten.to.dtype, a, dtype), b.call(aten.to.dtype, w, dtype)
        if slot.scaling != 1.0:
            w = b.call(aten.mul.Tensor, w, slot.scaling)
        if slot.r < rank:
            a = b.call(aten.constant_pad_nd.default, a, [0, 0, 0, rank - slot.r])
            w = b.call(aten.constant_pad_nd.default, w, [0, rank - slot.r])
        stacked_a.append(a)
        stacked_b.append(w)
    b.adapter = None
    some_a = next(a for a in stacked_a if a is not None)
    some_b = next(w for w in stacked_b if w is not None)
    zero_a = b.call(aten.zeros_like.default, some_a)
    zero_b = b.call(aten.zeros_like.default, some_b)
    bank_a = [a if a is not None else zero_a for a in stacked_a] + [zero_a]  # last slot: no adapter
    bank_b = [w if w is not None else zero_b for w in stacked_b] + [zero_b]
    a_rows = b.call(aten.index_select.default, b.call(aten.stack.default, bank_a), 0, ctx.row_index)
    b_rows = b.call(aten.index_select.default, b.call(aten.stack.default, bank_b), 0, ctx.row_index)
    rows = b.call(aten.sym_size.int, ctx.row_index, 0)
    if out_dtype != dtype:
        x = b.call(aten.to.dtype, x, dtype)
    x3 = b.call(aten.reshape.default, x, [rows, -1, first.in_features])
    h = b.call(aten.bmm.default, x3, b.call(aten.transpose.int, a_rows, 1, 2))
    h = b.call(aten.bmm.default, h, b.call(aten.transpose.int, b_rows, 1, 2))
    if out_dtype != dtype:
        h = b.call(aten.to.dtype, h, out_dtype)
    out = b.call(aten.add.Tensor, node, b.call(aten.reshape_as.default, h, node))
    b.replace_uses(node, out)


PASS = Pass(
    NAME,
    rules=(
        Rule("mixed", P(tuple(LINEAR_OPS), where=served_site(NAME, mixed=True)), _insert_mixed),
        Rule("linear", P(tuple(LINEAR_OPS), where=served_site(NAME, mixed=False)), _insert_lora),
    ),
    applies=lambda ctx: bool(ctx.positions(NAME) or ctx.mixed_of(NAME)),
)
