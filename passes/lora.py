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

import torch
from torch import fx

from peftfx.adapters import MOUNT
from peftfx.rewrite import Builder, Rule
from peftfx.select import LINEAR_OPS, META_KEY
from peftfx.slots import slot_path

from .context import PassContext

aten = torch.ops.aten
NAME = "lora"


def _site_key(node: fx.Node):
    site = node.meta.get(META_KEY, {}).get("site")
    return site["key"] if site else None


def _adapts(node: fx.Node, adapters, ctx: PassContext) -> bool:
    key = _site_key(node)
    return key is not None and any(key in ctx.store.lora.get(a, {}) for a in adapters)


def _weight(b: Builder, ctx: PassContext, adapter: str, key: str, which: str) -> fx.Node:
    return b.get_attr(f"{MOUNT}.{ctx.store.lora_weight_path(key, adapter, which)}")


def _insert_lora(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    """Add each active adapter's path, reading its tensors from the variant's slot bank (position i =
    i-th active adapter), so the graph is the same for every adapter of the same layout."""
    key = _site_key(node)
    x = LINEAR_OPS[node.target](node)[0]
    out_dtype = node.meta["val"].dtype if "val" in node.meta else None
    out = node
    for position, adapter in enumerate(ctx.lora):
        slot = ctx.store.lora.get(adapter, {}).get(key)
        if slot is None:
            continue
        b.adapter = adapter
        a_weight, _ = ctx.store.lora_weights(adapter, key)
        cast = out_dtype is not None and a_weight.dtype != out_dtype
        h = b.call(aten.to.dtype, x, a_weight.dtype) if cast else x
        if ctx.training and slot.dropout > 0:
            h = b.call(aten.dropout.default, h, slot.dropout, True)
        h = b.call(aten.linear.default, h, b.get_attr(slot_path(position, key, "A")))
        h = b.call(aten.linear.default, h, b.get_attr(slot_path(position, key, "B")))
        h = b.call(aten.mul.Tensor, h, b.get_attr(slot_path(position, key, "scaling")))
        if cast:
            h = b.call(aten.to.dtype, h, out_dtype)
        out = b.call(aten.add.Tensor, out, h)
    b.replace_uses(node, out)


def _insert_mixed(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    key = _site_key(node)
    x = LINEAR_OPS[node.target](node)[0]
    slots = {a: ctx.store.lora[a][key] for a in ctx.mixed if key in ctx.store.lora.get(a, {})}
    rank = max(s.r for s in slots.values())
    first = next(iter(slots.values()))
    dtype = ctx.store.lora_weights(next(iter(slots)), key)[0].dtype  # the adapters' math runs in it
    out_dtype = node.meta["val"].dtype if "val" in node.meta else dtype
    stacked_a, stacked_b = [], []
    for adapter in ctx.mixed:
        slot = slots.get(adapter)
        if slot is None:
            stacked_a.append(None)
            stacked_b.append(None)
            continue
        b.adapter = adapter
        a = _weight(b, ctx, adapter, key, "A")
        w = _weight(b, ctx, adapter, key, "B")
        if ctx.store.lora_weights(adapter, key)[0].dtype != dtype:
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
    stacked_a = [a if a is not None else zero_a for a in stacked_a] + [zero_a]  # last slot: no adapter
    stacked_b = [w if w is not None else zero_b for w in stacked_b] + [zero_b]
    a_rows = b.call(aten.index_select.default, b.call(aten.stack.default, stacked_a), 0, ctx.row_index)
    b_rows = b.call(aten.index_select.default, b.call(aten.stack.default, stacked_b), 0, ctx.row_index)
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


RULES = (
    Rule("mixed", lambda n, ctx: bool(ctx.mixed) and _adapts(n, ctx.mixed, ctx), _insert_mixed),
    Rule("linear", lambda n, ctx: _adapts(n, ctx.lora, ctx), _insert_lora),
)
