"""DoRA: after each targeted linear op rescale its output rows by g = m / ||W + s B A|| and add g * s * B(A(x)).

Eval (the norm folded into per-adapter constants by peftfx/methods/dora.py's `before_run`):
    y  = linear(x, W, b)
    y' = addcmul(linear(linear(x, A), B_eval, bias_eval), y, g)    # = g*(y - b) + b + g*s*B(A(x))
         with g = m / n, B_eval = (g*s) B, bias_eval = (1 - g) b (sites with a bias)

Train (the norm recomputed in the graph from detached A and B, without materialising W + s B A):
    n  = sqrt(||W||² + rowsum(C ⊙ (2 W Aᵀ + C A Aᵀ))),  C = s B              # ||W||² a buffer (W is frozen)
    g  = m / n                                                            # gradient reaches m
    dropout p = 0:  y' = addcmul(linear(linear(x, A), (g*s) B, (1 - g) b), y, g)
    dropout p > 0:  x' = dropout(x)
                    y' = y + addcmul(linear(linear(x', A), (g*s) B), x' Wᵀ, g - 1)   # PEFT's path

Several bound DoRA adapters apply one after another, each to the output of the previous (PEFT stacks
them this way). Mixed batches (eval) gather each row's A, B_eval, g and bias_eval (identity for rows
without a DoRA adapter) and apply them with two batched matmuls and one addcmul.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import fx

from peftfx.errors import ConfigError
from peftfx.rewrite import (
    LINEAR_OPS,
    Builder,
    Captures,
    P,
    Pass,
    PassContext,
    Rule,
    read_tensor,
    served_site,
    slot_path,
    store_path,
)
from peftfx.rewrite.layout import LinearParts

aten = torch.ops.aten
NAME = "dora"
M, SCALE, B_EVAL, BIAS_EVAL, W_NORM2 = "m", "dora_scale", "dora_B", "dora_bias", "dora_wnorm2"


def _validate(gm: fx.GraphModule, ctx: PassContext) -> None:
    quant = ctx.quant
    adapters = ctx.mixed_of(NAME) or [a for _, a in ctx.positions(NAME)]
    if quant is not None and any(quant.holds(s.weight_path) for a in adapters for s in ctx.store.sites[a].values()):
        raise ConfigError(
            "DoRA adapters need the full-precision base weights; DoRA on a quantized base is not "
            "supported (dequantize first)."
        )
    # the lora pass runs after this one, so at a shared site its delta lands under DoRA's rescaling:
    # right when the LoRA adapter comes first in the active order (PEFT applies them in that order)
    seen: set[str] = set()
    for adapter in ctx.bound:
        method = ctx.method_of(adapter)
        if method == NAME:
            seen |= set(ctx.store.sites.get(adapter, {}))
        elif method == "lora" and seen & set(ctx.store.sites.get(adapter, {})):
            raise ConfigError(
                f"LoRA adapter {adapter!r} is active after a DoRA adapter on the same layers; peftfx "
                "applies LoRA adapters before DoRA ones there: put the LoRA adapters first in "
                "set_adapter([...])."
            )


def _attr(b: Builder, position: int, key: str, which: str) -> fx.Node:
    return b.get_attr(slot_path(position, key, which))


def _insert_dora(b: Builder, ctx: PassContext, m: Captures) -> None:
    node, key = m["node"], m["key"]
    x, weight, bias, fan_in_fan_out = cast(LinearParts, LINEAR_OPS[node.target](node))  # selection read it
    out_dtype = node.meta["val"].dtype if "val" in node.meta else None
    out = node
    for position, adapter in ctx.positions(NAME):
        slot = ctx.store.sites.get(adapter, {}).get(key)
        if slot is None:
            continue
        b.adapter = adapter
        dtype = ctx.store.site_tensor(adapter, key, "A").dtype
        recast = out_dtype is not None and dtype != out_dtype
        xin = b.call(aten.to.dtype, x, dtype) if recast else x
        prev = b.call(aten.to.dtype, out, dtype) if recast else out
        has_bias = bool(slot.bias_path) and bias is not None
        if ctx.training:
            out = _train(b, position, key, slot, xin, prev, weight, bias if has_bias else None, fan_in_fan_out, dtype)
        else:
            h = b.call(aten.linear.default, xin, _attr(b, position, key, "A"))
            if has_bias:
                h = b.call(aten.linear.default, h, _attr(b, position, key, B_EVAL), _attr(b, position, key, BIAS_EVAL))
            else:
                h = b.call(aten.linear.default, h, _attr(b, position, key, B_EVAL))
            out = b.call(aten.addcmul.default, h, prev, _attr(b, position, key, SCALE))
        if recast:
            out = b.call(aten.to.dtype, out, out_dtype)
    b.replace_uses(node, out)


def _train(
    b: Builder,
    position: int,
    key: str,
    slot,
    x: fx.Node,
    prev: fx.Node,
    weight: fx.Node,
    bias,
    fan_in_fan_out: bool,
    dtype: torch.dtype,
) -> fx.Node:
    a, w_b = _attr(b, position, key, "A"), _attr(b, position, key, "B")
    s = _attr(b, position, key, "scaling")
    w_tensor = read_tensor(weight)
    if w_tensor is not None and w_tensor.dtype != dtype:
        weight = b.call(aten.to.dtype, weight, dtype)
    # n² = ||W||² + rowsum(C ⊙ (2 W Aᵀ + C A Aᵀ)) with C = s B, from detached A, B and W
    a_d, b_d = b.call(aten.detach.default, a), b.call(aten.detach.default, w_b)
    w_d = b.call(aten.detach.default, weight)
    a_t = b.call(aten.t.default, a_d)
    if fan_in_fan_out:  # W is (in, out): W_oi Aᵀ = (A W)ᵀ
        wa = b.call(aten.t.default, b.call(aten.mm.default, a_d, w_d))
    else:
        wa = b.call(aten.mm.default, w_d, a_t)
    c = b.call(aten.mul.Tensor, b_d, s)
    z = b.call(aten.addmm.default, wa, c, b.call(aten.mm.default, a_d, a_t), beta=2)
    n2 = b.call(
        aten.add.Tensor,
        _attr(b, position, key, W_NORM2),
        b.call(aten.sum.dim_IntList, b.call(aten.mul.Tensor, c, z), [1]),
    )
    g = b.call(aten.div.Tensor, _attr(b, position, key, M), b.call(aten.sqrt.default, n2))  # m gets its gradient here
    b_scaled = b.call(aten.mul.Tensor, w_b, b.call(aten.unsqueeze.default, b.call(aten.mul.Tensor, g, s), 1))
    if slot.dropout > 0:  # PEFT: (g - 1) * linear(dropout(x), W) + g * s * B(A(dropout(x))), no bias term
        xd = b.call(aten.dropout.default, x, slot.dropout, True)
        h = b.call(aten.linear.default, b.call(aten.linear.default, xd, a), b_scaled)
        base = b.call(aten.mm.default, xd, weight) if fan_in_fan_out else b.call(aten.linear.default, xd, weight)
        return b.call(aten.add.Tensor, prev, b.call(aten.addcmul.default, h, base, b.call(aten.sub.Tensor, g, 1.0)))
    h = b.call(aten.linear.default, x, a)
    if bias is not None:  # g * (y - b) + b = g * y + (1 - g) * b
        bias_tensor = read_tensor(bias)
        if bias_tensor is not None and bias_tensor.dtype != dtype:
            bias = b.call(aten.to.dtype, bias, dtype)
        h = b.call(aten.linear.default, h, b_scaled, b.call(aten.mul.Tensor, b.call(aten.rsub.Scalar, g, 1.0), bias))
    else:
        h = b.call(aten.linear.default, h, b_scaled)
    return b.call(aten.addcmul.default, h, prev, g)


def _insert_mixed(b: Builder, ctx: PassContext, m: Captures) -> None:
    """One path for a mixed batch: per-row A, B_eval, g, bias_eval gathered by the row index."""
    node, key = m["node"], m["key"]
    x, _, bias, _ = cast(LinearParts, LINEAR_OPS[node.target](node))
    slots = {a: ctx.store.sites[a][key] for a in ctx.mixed_of(NAME) if key in ctx.store.sites.get(a, {})}
    rank = max(s.r for s in slots.values())
    first = next(iter(slots.values()))
    dtype = ctx.store.site_tensor(next(iter(slots)), key, "A").dtype
    out_dtype = node.meta["val"].dtype if "val" in node.meta else dtype
    has_bias = bool(first.bias_path) and bias is not None
    names = ("A", B_EVAL, SCALE) + ((BIAS_EVAL,) if has_bias else ())
    stacks: dict[str, list] = {n: [] for n in names}
    for adapter in ctx.mixed:
        slot = slots.get(adapter)
        if slot is None:
            for n in names:
                stacks[n].append(None)
            continue
        b.adapter = adapter
        for n in names:
            t = b.get_attr(store_path(ctx.store.site_tensor_path(adapter, key, n)))
            if ctx.store.site_tensor(adapter, key, n).dtype != dtype:
                t = b.call(aten.to.dtype, t, dtype)
            if n == "A" and slot.r < rank:
                t = b.call(aten.constant_pad_nd.default, t, [0, 0, 0, rank - slot.r])
            if n == B_EVAL and slot.r < rank:
                t = b.call(aten.constant_pad_nd.default, t, [0, rank - slot.r])
            stacks[n].append(t)
    b.adapter = None
    rows_of = {}
    for n in names:
        some = next(t for t in stacks[n] if t is not None)
        identity = b.call(aten.ones_like.default if n == SCALE else aten.zeros_like.default, some)
        stacked = b.call(aten.stack.default, [t if t is not None else identity for t in stacks[n]] + [identity])
        rows_of[n] = b.call(aten.index_select.default, stacked, 0, ctx.row_index)  # last slot: no DoRA adapter
    rows = b.call(aten.sym_size.int, ctx.row_index, 0)
    if out_dtype != dtype:
        x = b.call(aten.to.dtype, x, dtype)
    y = b.call(aten.to.dtype, node, dtype) if out_dtype != dtype else node
    x3 = b.call(aten.reshape.default, x, [rows, -1, first.in_features])
    y3 = b.call(aten.reshape.default, y, [rows, -1, first.out_features])
    h = b.call(aten.bmm.default, x3, b.call(aten.transpose.int, rows_of["A"], 1, 2))
    h = b.call(aten.bmm.default, h, b.call(aten.transpose.int, rows_of[B_EVAL], 1, 2))
    if has_bias:
        h = b.call(aten.add.Tensor, h, b.call(aten.unsqueeze.default, rows_of[BIAS_EVAL], 1))
    out = b.call(aten.addcmul.default, h, y3, b.call(aten.unsqueeze.default, rows_of[SCALE], 1))
    if out_dtype != dtype:
        out = b.call(aten.to.dtype, out, out_dtype)
    b.replace_uses(node, b.call(aten.reshape_as.default, out, node))


PASS = Pass(
    NAME,
    rules=(
        Rule("mixed", P(tuple(LINEAR_OPS), where=served_site(NAME, mixed=True)), _insert_mixed),
        Rule("linear", P(tuple(LINEAR_OPS), where=served_site(NAME, mixed=False)), _insert_dora),
    ),
    applies=lambda ctx: bool(ctx.positions(NAME) or ctx.mixed_of(NAME)),
    validate=_validate,
)
