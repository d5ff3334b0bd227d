"""IA3: scale each targeted linear op's input (feed-forward sites) or output (other sites) by learned vectors.

Before:  y = linear(x, W, b)                      (or addmm(b, x, W) for GPT-2's Conv1D)
After:   feed-forward:  y  = linear(x * s, W, b)   s = l_1 * l_2 * ...: the active adapters' vectors,
         otherwise:     y' = linear(x, W, b) * s   flattened and multiplied (PEFT's ia3_scaling);
                                                    users of y now read y'

The vectors are read through the variant's slot bank (position i = i-th active adapter), so one graph
serves every adapter of the same layout. Where a vector's dtype differs from the activations' (fp32
vectors on a bf16 model) the product is computed as PEFT does (input cast to the vector's dtype, the
result cast back).

Mixed batches (one adapter per row) stack the adapters' vectors (ones for adapters without the site and
for rows without adapter, the last index), pick each row's vector with the row-index input and scale the
rows in one broadcast multiply.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, cast

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
NAME = "ia3"


def _dtype(node: object) -> Optional[torch.dtype]:
    """The dtype export recorded for a node (None for nodes a pass inserted)."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _input(node: fx.Node) -> tuple[fx.Node, int]:
    """The linear op's input and its argument index (0 for linear, 1 for addmm)."""
    read = LINEAR_OPS[cast(Callable[..., Any], node.target)]  # a call_function's target is its op
    x = cast(LinearParts, read(node))[0]  # selection marks only sites it could read
    return x, next(i for i, a in enumerate(node.args) if a is x)


def _scale(
    b: Builder, h: fx.Node, scale: fx.Node, scale_dtype: torch.dtype, h_dtype: Optional[torch.dtype], feedforward: bool
) -> fx.Node:
    """PEFT's arithmetic: feed-forward `(x.to(l.dtype) * s).to(x.dtype)`, output `(y * s).to(y.dtype)`."""
    cast = h_dtype is not None and h_dtype != scale_dtype
    if cast and feedforward:
        h = b.call(aten.to.dtype, h, scale_dtype)
    h = b.call(aten.mul.Tensor, h, scale)
    return b.call(aten.to.dtype, h, h_dtype) if cast else h


def _product(b: Builder, ctx: PassContext, key: str, served: list[tuple[int, str]]) -> tuple[fx.Node, torch.dtype]:
    """The product of the served adapters' flattened vectors (slot-bank reads) and its dtype (the last one's)."""
    scale = None
    for position, adapter in served:
        b.adapter = adapter
        vector = b.call(aten.reshape.default, b.get_attr(slot_path(position, key, "l")), [-1])
        scale = vector if scale is None else b.call(aten.mul.Tensor, scale, vector)
    b.adapter = None
    return cast(fx.Node, scale), ctx.store.site_tensor(served[-1][1], key, "l").dtype  # served is never empty


def _insert(b: Builder, ctx: PassContext, m: Captures) -> None:
    node, key = m["node"], m["key"]
    served = [
        (position, adapter, ctx.store.sites[adapter][key])
        for position, adapter in ctx.positions(NAME)
        if key in ctx.store.sites.get(adapter, {})
    ]
    inputs = [(p, a) for p, a, site in served if site.feedforward]
    outputs = [(p, a) for p, a, site in served if not site.feedforward]
    if inputs:
        x, index = _input(node)
        b.continue_after(node.prev)  # the scaled input feeds the linear: build it just before
        scale, dtype = _product(b, ctx, key, inputs)
        b.set_arg(node, index, _scale(b, x, scale, dtype, _dtype(x), feedforward=True))
    if outputs:
        b.continue_after(node)
        scale, dtype = _product(b, ctx, key, outputs)
        b.replace_uses(node, _scale(b, node, scale, dtype, _dtype(node), feedforward=False))


def _row_scales(b: Builder, ctx: PassContext, key: str, group: dict) -> tuple[fx.Node, torch.dtype]:
    """[batch, features]: each row's vector, picked from the stacked vectors by the row-index input."""
    dtype = ctx.store.site_tensor(next(iter(group)), key, "l").dtype
    vectors: list[Optional[fx.Node]] = []
    for adapter in ctx.mixed:
        if adapter not in group:
            vectors.append(None)
            continue
        b.adapter = adapter
        vector = b.call(
            aten.reshape.default, b.get_attr(store_path(ctx.store.site_tensor_path(adapter, key, "l"))), [-1]
        )
        if ctx.store.site_tensor(adapter, key, "l").dtype != dtype:
            vector = b.call(aten.to.dtype, vector, dtype)
        vectors.append(vector)
    b.adapter = None
    ones = b.call(aten.ones_like.default, next(v for v in vectors if v is not None))
    stacked = b.call(aten.stack.default, [v if v is not None else ones for v in vectors] + [ones])  # last: no adapter
    return b.call(aten.index_select.default, stacked, 0, ctx.row_index), dtype


def _scale_rows(
    b: Builder, ctx: PassContext, h: fx.Node, rows: fx.Node, dtype: torch.dtype, features: int, feedforward: bool
) -> fx.Node:
    """h ([batch, ..., features], or [batch * seq, features] for Conv1D's addmm) scaled row by row."""
    h_dtype = _dtype(h)
    cast = h_dtype is not None and h_dtype != dtype
    g = b.call(aten.to.dtype, h, dtype) if cast and feedforward else h
    batch = b.call(aten.sym_size.int, ctx.row_index, 0)
    g = b.call(aten.reshape.default, g, [batch, -1, features])
    g = b.call(aten.mul.Tensor, g, b.call(aten.unsqueeze.default, rows, 1))
    g = b.call(aten.reshape_as.default, g, h)
    return b.call(aten.to.dtype, g, h_dtype) if cast else g


def _insert_mixed(b: Builder, ctx: PassContext, m: Captures) -> None:
    node, key = m["node"], m["key"]
    sites = {a: ctx.store.sites[a][key] for a in ctx.mixed_of(NAME) if key in ctx.store.sites.get(a, {})}
    inputs = {a: s for a, s in sites.items() if s.feedforward}
    outputs = {a: s for a, s in sites.items() if not s.feedforward}
    if inputs:
        x, index = _input(node)
        b.continue_after(node.prev)
        rows, dtype = _row_scales(b, ctx, key, inputs)
        features = next(iter(inputs.values())).in_features
        b.set_arg(node, index, _scale_rows(b, ctx, x, rows, dtype, features, feedforward=True))
    if outputs:
        b.continue_after(node)
        rows, dtype = _row_scales(b, ctx, key, outputs)
        features = next(iter(outputs.values())).out_features
        b.replace_uses(node, _scale_rows(b, ctx, node, rows, dtype, features, feedforward=False))


PASS = Pass(
    NAME,
    rules=(
        Rule("mixed", P(tuple(LINEAR_OPS), where=served_site(NAME, mixed=True)), _insert_mixed),
        Rule("linear", P(tuple(LINEAR_OPS), where=served_site(NAME, mixed=False)), _insert),
    ),
    applies=lambda ctx: bool(ctx.positions(NAME) or ctx.mixed_of(NAME)),
)
