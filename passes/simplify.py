"""Simplify: drop the export graph's no-op calls and let attention read grouped K/V heads as they are.

An exported decoder step is a few hundred small calls, and at one token per row each call costs more
in dispatch than in arithmetic. Some of those calls do nothing, and attention copies what it needs
only to read. Three rules, eval variants only, each checked against the shapes and dtypes export
recorded (`meta["val"]`), so nodes a pass inserted (which carry none) are never touched:

noop_cast          x.to(dtype/device) where x already has them: the call returns x itself.
identity           x * 1, x / 1, x + 0, x - 0 of the same dtype (rotary `cos * attention_scaling`,
                   `arange + 0`), when nothing writes in place to the result.
grouped_attention  sdpa(q, repeat_kv(k), repeat_kv(v)) with repeat_kv = unsqueeze(2) → expand → reshape
                   (transformers' grouped-query attention) ⇒ sdpa(q, k, v, enable_gqa=True). The reshape
                   copies the whole KV cache per layer and step; on CPU the fused kernel reads the
                   grouped heads directly, bit for bit the same output in half the time. CPU only: on
                   CUDA a masked grouped call falls back to the math kernel.

Outputs are unchanged (tests/test_simplify.py compares the graphs bit for bit).
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq
from torch.fx.operator_schemas import normalize_function

from peftfx.rewrite import ANY, Builder, Captures, P, Pass, PassContext, Rule

aten = torch.ops.aten
NAME = "simplify"
_CASTS = (aten.to.dtype, aten.to.device, aten.to.dtype_layout)
_IDENTITY = {aten.mul.Tensor: 1, aten.div.Tensor: 1, aten.add.Tensor: 0, aten.sub.Tensor: 0}
_SDPA = aten.scaled_dot_product_attention.default


def _val(node: Any) -> Optional[torch.Tensor]:
    """The example value export recorded for a node (None for nodes a pass inserted)."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _same_kind(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return a is not None and b is not None and a.dtype == b.dtype and a.device == b.device


def _written_later(node: fx.Node) -> bool:
    """Whether an in-place op writes to `node`'s result or to a view of it."""
    todo, seen = [node], set()
    while todo:
        for user in todo.pop().users:
            target = user.target
            if user in seen or not isinstance(target, torch._ops.OpOverload):
                continue
            seen.add(user)
            if target._schema.is_mutable:
                return True
            if any(ret.alias_info is not None for ret in target._schema.returns):
                todo.append(user)  # a view: writes to it are writes to `node`
    return False


def _drop(b: Builder, ctx: PassContext, m: Captures) -> None:
    b.replace_uses(m["node"], m["x"])


# -- noop_cast -----------------------------------------------------------------------------------------


def _is_noop_cast(node: fx.Node, ctx: PassContext) -> bool:
    """x.to(...) that returns x itself: same dtype and device, no copy, no other memory format."""
    if node.op != "call_function" or node.target not in _CASTS:
        return False
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    options = normalized.kwargs if normalized else {}
    if options.get("copy") or options.get("memory_format") not in (None, torch.preserve_format):
        return False
    return _same_kind(_val(node.args[0]), _val(node))


# -- identity --------------------------------------------------------------------------------------------


def _is_identity(node: fx.Node, ctx: PassContext) -> bool:
    """x op c with c the op's identity element, result of x's shape, strides and dtype, never written."""
    if node.op != "call_function" or node.target not in _IDENTITY or node.kwargs:
        return False
    x, other = node.args
    if isinstance(other, bool) or not isinstance(other, (int, float)) or other != _IDENTITY[node.target]:
        return False
    before, after = _val(x), _val(node)
    if before is None or after is None:  # a node a pass inserted (no recorded value)
        return False
    return (
        _same_kind(before, after)
        and statically_known_true(sym_eq(before.shape, after.shape))
        and statically_known_true(sym_eq(before.stride(), after.stride()))
        and not _written_later(node)
    )


# -- grouped_attention -----------------------------------------------------------------------------------


def _groups(repeated: fx.Node) -> Optional[int]:
    """For reshape(expand(unsqueeze(k, 2), [b, h, g, s, d]), [b, h * g, s, d]) (the pattern below matched
    its shape): g, when export's shapes confirm it (static head counts, h * g heads out)."""
    expanded = cast(fx.Node, repeated.args[0])
    unsqueezed = cast(fx.Node, expanded.args[0])
    k, wide, out = _val(unsqueezed.args[0]), _val(expanded), _val(repeated)
    if k is None or wide is None or out is None or k.dim() != 4 or wide.dim() != 5 or out.dim() != 4:
        return None
    heads, groups = k.shape[1], wide.shape[2]
    if not all(isinstance(n, int) for n in (heads, groups, out.shape[1])) or out.shape[1] != heads * groups:
        return None
    return groups


def _repeat_kv(name: str) -> P:
    """transformers' repeat_kv of the grouped heads captured as `name`."""
    return P(
        aten.reshape.default,
        P(aten.expand.default, P(aten.unsqueeze.default, ANY(name), 2)),
        where=lambda node, ctx: _groups(node) is not None,
    )


def _reads_repeated_heads(node: fx.Node, ctx: PassContext) -> bool:
    """A CPU sdpa not already grouped, whose keys and values repeat their heads the same number of times."""
    q = _val(node.args[0])
    return (
        not node.kwargs.get("enable_gqa")
        and q is not None
        and q.device.type == "cpu"
        and _groups(cast(fx.Node, node.args[1])) == _groups(cast(fx.Node, node.args[2]))
    )


def _read_grouped(b: Builder, ctx: PassContext, m: Captures) -> None:
    node = m["node"]
    b.set_args(node, (node.args[0], m["k"], m["v"], *node.args[3:]), {**node.kwargs, "enable_gqa": True})


PASS = Pass(
    NAME,
    rules=(
        Rule("noop_cast", P(_CASTS, ANY("x"), where=_is_noop_cast), _drop),
        Rule("identity", P(tuple(_IDENTITY), ANY("x"), ANY(), nargs=2, where=_is_identity), _drop),
        Rule(
            "grouped_attention",
            P(_SDPA, ANY("q"), _repeat_kv("k"), _repeat_kv("v"), where=_reads_repeated_heads),
            _read_grouped,
        ),
    ),
    applies=lambda ctx: not ctx.training,
    provenance=False,  # restructures what export recorded (no node of its own to draw)
)
