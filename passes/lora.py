"""LoRA: after each targeted linear op add `scaling * B(A(dropout(x)))`, per active adapter.

Before:  y = linear(x, W, b)                 (or addmm(b, x, W) for GPT-2's Conv1D)
After:   y = linear(x, W, b)
         h = linear(linear(dropout(x), A), B)   # dropout only in train mode, only if p > 0
         y' = y + h * scaling                   # users of y now read y'
"""
from __future__ import annotations

import torch
from torch import fx

from peftfx.adapters import MOUNT
from peftfx.rewrite import Builder, Rule
from peftfx.select import LINEAR_OPS, META_KEY

from .context import PassContext

aten = torch.ops.aten
NAME = "lora"


def _site_key(node: fx.Node):
    site = node.meta.get(META_KEY, {}).get("site")
    return site["key"] if site else None


def _is_adapted_linear(node: fx.Node, ctx: PassContext) -> bool:
    key = _site_key(node)
    return key is not None and any(key in ctx.store.lora.get(a, {}) for a in ctx.active)


def _insert_lora(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    key = _site_key(node)
    x = LINEAR_OPS[node.target](node)[0]
    out_dtype = node.meta["val"].dtype if "val" in node.meta else None
    out = node
    for adapter in ctx.active:
        slot = ctx.store.lora.get(adapter, {}).get(key)
        if slot is None:
            continue
        b.adapter = adapter
        a_weight, _ = ctx.store.lora_weights(adapter, key)
        h = x
        if out_dtype is not None and a_weight.dtype != out_dtype:
            h = b.call(aten.to.dtype, h, a_weight.dtype)
        if ctx.training and slot.dropout > 0:
            h = b.call(aten.dropout.default, h, slot.dropout, True)
        h = b.call(aten.linear.default, h, b.get_attr(f"{MOUNT}.{ctx.store.lora_weight_path(key, adapter, 'A')}"))
        h = b.call(aten.linear.default, h, b.get_attr(f"{MOUNT}.{ctx.store.lora_weight_path(key, adapter, 'B')}"))
        if slot.scaling != 1.0:
            h = b.call(aten.mul.Tensor, h, slot.scaling)
        if out_dtype is not None and a_weight.dtype != out_dtype:
            h = b.call(aten.to.dtype, h, out_dtype)
        out = b.call(aten.add.Tensor, out, h)
    b.replace_uses(node, out)


RULES = (Rule("linear", _is_adapted_linear, _insert_lora),)
