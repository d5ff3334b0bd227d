"""Prefix tuning: learned keys and values in front of every attention layer's own.

The variant starts from a base graph captured with `position_ids` (PEFT's real tokens sit at positions
P..P+L-1, after the prefix). This pass computes those positions inside the graph and, at the i-th
attention op (layer i), prepends that layer's prefix:

Before:  out = scaled_dot_product_attention(q, k, v, mask)          # k, v: [B, heads, L, d]
After:   pk, pv = prefix[:, 2i], prefix[:, 2i+1]                    # [P, kv heads, d] each
         k' = cat([repeat_heads(pk).expand(B, ...), k], 2)           # grouped-query: kv heads repeated
         v' = cat([repeat_heads(pv).expand(B, ...), v], 2)
         mask' = cat([visible(B, 1, L, P), mask], -1)                # prefix always visible
         out = scaled_dot_product_attention(q, k', v', mask')
With no mask and `is_causal=True` the pass writes the causal mask with the prefix columns open.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from peftfx.adapters import MOUNT
from peftfx.errors import ConfigError
from peftfx.graph_inputs import remove_keyword_input
from peftfx.rewrite import Builder, Rule

from .context import PassContext

aten = torch.ops.aten
NAME = "prefix"
ATTENTION_OPS = (aten.scaled_dot_product_attention.default,)
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _active(ctx: PassContext) -> bool:
    return bool(ctx.prompt) and ctx.store.kinds.get(ctx.prompt[0]) == "PREFIX_TUNING"


def _config(ctx: PassContext):
    return ctx.store.configs[ctx.prompt[0]]


def _is_positions(node: fx.Node, ctx: PassContext) -> bool:
    return _active(ctx) and node.op == "placeholder" and node.target == "position_ids"


def _positions(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    """position_ids := arange(P, P+L) for every row."""
    gm = node.graph.owning_module
    _layers(gm, ctx)  # refuse a graph whose attention ops the pass cannot find, before changing anything
    b.adapter = ctx.prompt[0]
    p = _config(ctx).num_virtual_tokens
    source = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target in ("input_ids", "inputs_embeds"))
    rows = b.call(aten.sym_size.int, source, 0)
    length = b.call(aten.sym_size.int, source, 1)
    end = b.call(operator.add, length, p)
    positions = b.call(aten.arange.start, p, end, dtype=torch.long, device=node.meta["val"].device)
    positions = b.call(aten.expand.default, b.call(aten.unsqueeze.default, positions, 0), [rows, length])
    b.replace_uses(node, positions)
    remove_keyword_input(gm, "position_ids")


def attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]


def _layers(gm: fx.GraphModule, ctx: PassContext) -> dict[fx.Node, int]:
    """Attention op -> layer: its rank among the graph's attention ops (checked against num_layers)."""
    if "prefix_layers" not in ctx.scratch:
        nodes = attention_nodes(gm)
        layers = _config(ctx).num_layers
        if len(nodes) != layers:
            raise ConfigError(
                f"prefix tuning found {len(nodes)} attention ops (scaled_dot_product_attention) in the graph "
                f"but the config has num_layers={layers}. Load the model with attn_implementation='sdpa' "
                "(eager attention is not matched yet) or set num_layers to the number of attention layers.")
        ctx.scratch["prefix_layers"] = {n: i for i, n in enumerate(nodes)}
    return ctx.scratch["prefix_layers"]


def _is_attention(node: fx.Node, ctx: PassContext) -> bool:
    return _active(ctx) and node.op == "call_function" and node.target in ATTENTION_OPS


def _prefix_table(ctx: PassContext, b: Builder) -> fx.Node:
    """[P, 2 * layers, kv heads, head dim], computed once (the MLP runs here when projected)."""
    if "prefix_table" in ctx.scratch:
        return ctx.scratch["prefix_table"]
    config = _config(ctx)
    adapter = ctx.prompt[0]
    encoder = ctx.store.prompts[adapter]
    base = f"{MOUNT}.{ctx.store.prompt_module_path(adapter)}"
    table = b.get_attr(f"{base}.embedding.weight")
    if encoder.projected:
        first, last = f"{base}.transform.0", f"{base}.transform.2"
        table = b.call(aten.linear.default, table, b.get_attr(f"{first}.weight"), b.get_attr(f"{first}.bias"))
        table = b.call(aten.tanh.default, table)
        table = b.call(aten.linear.default, table, b.get_attr(f"{last}.weight"), b.get_attr(f"{last}.bias"))
    table = b.call(aten.view.default, table, [config.num_virtual_tokens, config.num_layers * 2,
                                              config.num_attention_heads, config.kv_head_dim])
    ctx.scratch["prefix_table"] = table
    return table


def _prefix_states(b: Builder, table: fx.Node, index: int, like: fx.Node, ctx: PassContext) -> fx.Node:
    """Layer `index`'s keys or values shaped like `like` ([B, heads, L, d]) but with P positions."""
    config = _config(ctx)
    p, kv_heads, dim = config.num_virtual_tokens, config.num_attention_heads, config.kv_head_dim
    val = like.meta["val"]
    heads = val.shape[1]
    if heads % kv_heads or val.shape[3] != dim:
        raise ConfigError(f"prefix tuning: attention layer has {heads} heads of size {val.shape[3]}, the prefix "
                          f"{kv_heads} heads of size {dim}; set num_attention_heads/token_dim to match the model.")
    states = b.call(aten.permute.default, b.call(aten.select.int, table, 1, index), [1, 0, 2])  # [kv, P, d]
    rows = b.call(aten.sym_size.int, like, 0)
    if heads != kv_heads:  # grouped-query attention: each kv head serves heads // kv_heads query heads
        states = b.call(aten.unsqueeze.default, states, 1)
        states = b.call(aten.expand.default, states, [kv_heads, heads // kv_heads, p, dim])
        states = b.call(aten.reshape.default, states, [heads, p, dim])
    states = b.call(aten.expand.default, b.call(aten.unsqueeze.default, states, 0), [rows, heads, p, dim])
    return b.call(aten.to.dtype, states, val.dtype)


def _attention(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    layer = _layers(node.graph.owning_module, ctx)[node]
    b.adapter = ctx.prompt[0]
    args = dict(zip(SDPA_ARGS, node.args))
    args.update(node.kwargs)
    p = _config(ctx).num_virtual_tokens
    b.continue_after(node.prev)  # the prefix feeds the op
    table = _prefix_table(ctx, b)
    key, value = args["key"], args["value"]
    args["key"] = b.call(aten.cat.default, [_prefix_states(b, table, 2 * layer, key, ctx), key], 2)
    args["value"] = b.call(aten.cat.default, [_prefix_states(b, table, 2 * layer + 1, value, ctx), value], 2)
    mask = args.get("attn_mask")
    if mask is not None:
        args["attn_mask"] = _open_prefix(b, mask, p)
    elif args.get("is_causal"):
        args["attn_mask"] = _causal_with_prefix(b, args["query"], key, p)
        args["is_causal"] = False
    node.args = ()
    node.kwargs = args


def _open_prefix(b: Builder, mask: fx.Node, p: int) -> fx.Node:
    """Prepend P visible key columns (True for boolean masks, 0 for additive ones)."""
    dims = mask.meta["val"].dim()
    first = b.call(aten.slice.Tensor, mask, dims - 1, 0, 1)
    visible = b.call(aten.ones_like.default, first) if mask.meta["val"].dtype == torch.bool \
        else b.call(aten.zeros_like.default, first)
    visible = b.call(aten.expand.default, visible, [-1] * (dims - 1) + [p])
    return b.call(aten.cat.default, [visible, mask], dims - 1)


def _causal_with_prefix(b: Builder, query: fx.Node, key: fx.Node, p: int) -> fx.Node:
    """mask[i, j] = j <= i + P + (keys - queries): the prefix and every earlier real key are visible."""
    device = query.meta["val"].device
    queries = b.call(aten.sym_size.int, query, 2)
    keys = b.call(aten.sym_size.int, key, 2)
    q_pos = b.call(aten.arange.default, queries, dtype=torch.long, device=device)
    k_pos = b.call(aten.arange.default, b.call(operator.add, keys, p), dtype=torch.long, device=device)
    offset = b.call(operator.add, b.call(operator.sub, keys, queries), p)
    limit = b.call(aten.unsqueeze.default, b.call(aten.add.Tensor, q_pos, offset), 1)
    return b.call(aten.le.Tensor, b.call(aten.unsqueeze.default, k_pos, 0), limit)


RULES = (
    Rule("positions", _is_positions, _positions),
    Rule("attention", _is_attention, _attention),
)
