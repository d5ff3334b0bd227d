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

Models loaded with `attn_implementation="eager"` have no attention op; the pass finds the eager pattern
instead and rewrites it the same way:

Before:  probs = softmax(mul(matmul(q, transpose(k)), scale) + mask)  ...  out = matmul(probs, v)
After:   probs = softmax(mul(matmul(q, transpose(cat([pk, k], 2))), scale) + cat([zeros(.., P), mask], -1))
         out = matmul(probs, cat([pv, v], 2))
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import fx

from peftfx.errors import ConfigError
from peftfx.rewrite import INPUT, Builder, Captures, Match, P, Pass, PassContext, Rule, store_path
from peftfx.rewrite.graph_inputs import remove_keyword_input

aten = torch.ops.aten
NAME = "prefix"
ATTENTION_OPS = (aten.scaled_dot_product_attention.default,)
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _positions(b: Builder, ctx: PassContext, m: Captures) -> None:
    """position_ids := the positions the model gives its tokens under PEFT, after P cached prefix tokens:
    arange(P, P+L) for every row, or, for models that count positions in the attention mask, the mask's
    cumsum over cat(ones(B, P), mask) (padded tokens stay at -1)."""
    node, gm = m["node"], b.gm
    b.adapter = ctx.prompt[0]
    p = ctx.prompt_config.num_virtual_tokens
    inputs = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.meta["val"].dim() == 2 and ctx.positions_from_mask:
        b.continue_after(list(inputs.values())[-1])  # after the last placeholder: the mask too
        counted = b.call(aten.add.Tensor, b.call(aten.cumsum.default, mask, 1), p)  # = cumsum of the full mask
        positions = b.call(aten.sub.Tensor, b.call(aten.mul.Tensor, counted, mask), 1)
        positions = b.call(aten.to.dtype, positions, torch.long)
    else:
        source = inputs.get("input_ids", inputs.get("inputs_embeds"))
        rows = b.call(aten.sym_size.int, source, 0)
        length = b.call(aten.sym_size.int, source, 1)
        end = b.call(operator.add, length, p)
        positions = b.call(aten.arange.start, p, end, dtype=torch.long, device=node.meta["val"].device)
        positions = b.call(aten.expand.default, b.call(aten.unsqueeze.default, positions, 0), [rows, length])
    b.replace_uses(node, positions)
    remove_keyword_input(gm, "position_ids")


@dataclass(frozen=True)
class EagerAttention:
    """softmax(f(matmul(q, transpose(k)), mask...)) -> matmul(probs, v), as HF's eager attention writes it."""

    scores: fx.Node  # matmul(q, kᵀ)
    path: tuple[fx.Node, ...]  # elementwise nodes from the scores to the softmax (scale, masks, casts)
    output: fx.Node  # matmul(probs, v)


SOFTMAX_OPS = (aten.softmax.int, aten._softmax.default)
SCORE_OPS = (
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.where.self,
    aten.where.ScalarOther,
    aten.where.ScalarSelf,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.to.dtype,
    aten._to_copy.default,
)
PROBS_OPS = (
    aten.to.dtype,
    aten._to_copy.default,
    aten.dropout.default,
    aten.type_as.default,
    aten.clone.default,
    aten.contiguous.default,
)
TRANSPOSE_LAST = ({2, 3}, {-1, -2}, {3, -2}, {2, -1})


def _is_key_transpose(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.target == aten.transpose.int
        and cast(fx.Node, node.args[0]).meta["val"].dim() == 4
        and set(node.args[1:3]) in TRANSPOSE_LAST
    )


def _scores_path(node, depth: int = 8) -> Optional[list[fx.Node]]:
    """Walk back from a softmax input through elementwise ops to matmul(q, transpose(k)); [] if not found."""
    if not isinstance(node, fx.Node) or depth == 0:
        return None
    if node.target == aten.matmul.default and _is_key_transpose(node.args[1]):
        return [node]
    if node.target not in SCORE_OPS:
        return None
    for arg in node.args:
        path = _scores_path(arg, depth - 1)
        if path:
            return path + [node]
    return None


def _data_users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the value (export adds `_assert_tensor_metadata` checks beside the real users)."""
    return [u for u in node.users if u.target != aten._assert_tensor_metadata.default]


def eager_attention(node: fx.Node) -> Optional[EagerAttention]:
    """The eager attention pattern around this softmax node, or None."""
    if node.op != "call_function" or node.target not in SOFTMAX_OPS:
        return None
    path = _scores_path(node.args[0])
    probs = node
    while len(_data_users(probs)) == 1 and _data_users(probs)[0].target in PROBS_OPS:
        probs = _data_users(probs)[0]
    output = _data_users(probs)[0] if len(_data_users(probs)) == 1 else None
    if not path or output is None or output.target != aten.matmul.default or output.args[0] is not probs:
        return None
    return EagerAttention(scores=path[0], path=tuple(path[1:]), output=output)


def attention_sites(gm: fx.GraphModule) -> list[fx.Node]:
    """Attention ops and eager-attention softmax nodes, in graph (= layer) order."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and (n.target in ATTENTION_OPS or eager_attention(n) is not None)
    ]


def _same_size(a, b) -> bool:
    return str(a) == str(b)


def _mask_operands(site: EagerAttention) -> list[tuple[fx.Node, int, fx.Node]]:
    """(step, argument index, operand) for every operand of the score path with one column per key (a
    mask): each needs P columns in front so the prefix keys line up."""
    keys = site.scores.meta["val"].shape[-1]
    widened = {site.scores, *site.path}
    found = []
    for step in site.path:
        for index, operand in enumerate(step.args):
            if (
                isinstance(operand, fx.Node)
                and operand not in widened
                and operand.meta["val"].dim() > 0
                and not _same_size(operand.meta["val"].shape[-1], 1)
                and _same_size(operand.meta["val"].shape[-1], keys)
            ):
                found.append((step, index, operand))
    return found


def _visible_value(op, index: int, operand: fx.Node) -> Any:
    """What a prefix column holds in `operand` so that the prefix stays visible through `op` (None: no
    such value)."""
    boolean = operand.meta["val"].dtype == torch.bool
    if op in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf) and index == 0:
        return True  # where(keep, scores, -inf)
    if op in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and index == 1:
        return False  # masked_fill(scores, hide, -inf)
    if op in (aten.add.Tensor, aten.sub.Tensor) and not boolean:
        return 0.0  # additive mask
    if op in (aten.mul.Tensor, aten.div.Tensor) and not boolean:
        return 1.0
    return None


def _sdpa_args(node: fx.Node) -> dict[str, Any]:
    args = dict(zip(SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _check_heads(like: fx.Node, ctx: PassContext) -> None:
    """The prefix's keys/values must fit an attention operand `like` ([B, heads, L, d])."""
    config = ctx.prompt_config
    kv_heads, dim = config.num_attention_heads, config.kv_head_dim
    val = like.meta["val"]
    heads = val.shape[1]
    if heads % kv_heads or val.shape[3] != dim:
        raise ConfigError(
            f"prefix tuning: attention layer has {heads} heads of size {val.shape[3]}, the prefix "
            f"{kv_heads} heads of size {dim}; set num_attention_heads/token_dim to match the model."
        )


def _validate(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Refuse a graph whose attention layers the pass cannot find or extend, before changing anything;
    records each attention site's layer (its rank among the sites, checked against num_layers)."""
    nodes = attention_sites(gm)
    layers = ctx.prompt_config.num_layers
    if len(nodes) != layers:
        raise ConfigError(
            f"prefix tuning found {len(nodes)} attention layers in the graph (scaled_dot_product_attention "
            f"ops or eager softmax(q·kᵀ)·v patterns) but the config has num_layers={layers}. Set "
            "num_layers to the number of attention layers, or load the model with attn_implementation='sdpa'."
        )
    ctx.scratch["prefix_layers"] = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        if node.target in ATTENTION_OPS:
            args = _sdpa_args(node)
            _check_heads(args["key"], ctx)
            _check_heads(args["value"], ctx)
            continue
        site = cast(EagerAttention, eager_attention(node))  # attention_sites kept it for its pattern
        key_t = cast(fx.Node, site.scores.args[1])  # transpose(k), as _is_key_transpose checked
        _check_heads(cast(fx.Node, key_t.args[0]), ctx)
        for step, index, operand in _mask_operands(site):
            if _visible_value(step.target, index, operand) is None:
                raise ConfigError(
                    f"prefix tuning cannot extend the attention-score operand {operand.name} of "
                    f"{step.target}; load the model with attn_implementation='sdpa'."
                )
        _check_heads(cast(fx.Node, site.output.args[1]), ctx)


def _layer(node: fx.Node, ctx: PassContext) -> Optional[Captures]:
    """The attention site's layer, recorded by `_validate`."""
    layer = ctx.scratch.get("prefix_layers", {}).get(node)
    return None if layer is None else {"layer": layer}


def _eager_site(node: fx.Node, ctx: PassContext) -> Optional[Captures]:
    """The eager attention pattern around a softmax: its scores, score path, output, masks and layer."""
    site = eager_attention(node)
    layer = _layer(node, ctx) if site is not None else None
    if site is None or layer is None:
        return None
    return {"scores": site.scores, "path": site.path, "output": site.output, "masks": _mask_operands(site), **layer}


def _prefix_table(ctx: PassContext, b: Builder) -> fx.Node:
    """[P, 2 * layers, kv heads, head dim], computed once (the MLP runs here when projected)."""
    if "prefix_table" in ctx.scratch:
        return ctx.scratch["prefix_table"]
    config = ctx.prompt_config
    adapter = ctx.prompt[0]
    encoder = ctx.store.prompts[adapter]
    base = store_path(ctx.store.prompt_module_path(adapter))
    table = b.get_attr(f"{base}.embedding.weight")
    if encoder.projected:
        first, last = f"{base}.transform.0", f"{base}.transform.2"
        table = b.call(aten.linear.default, table, b.get_attr(f"{first}.weight"), b.get_attr(f"{first}.bias"))
        table = b.call(aten.tanh.default, table)
        table = b.call(aten.linear.default, table, b.get_attr(f"{last}.weight"), b.get_attr(f"{last}.bias"))
    table = b.call(
        aten.view.default,
        table,
        [config.num_virtual_tokens, config.num_layers * 2, config.num_attention_heads, config.kv_head_dim],
    )
    ctx.scratch["prefix_table"] = table
    return table


def _prefix_states(b: Builder, table: fx.Node, index: int, like: fx.Node, ctx: PassContext) -> fx.Node:
    """Layer `index`'s keys or values shaped like `like` ([B, heads, L, d]) but with P positions (the
    head counts were checked by `_validate`)."""
    config = ctx.prompt_config
    p, kv_heads, dim = config.num_virtual_tokens, config.num_attention_heads, config.kv_head_dim
    val = like.meta["val"]
    heads = val.shape[1]
    states = b.call(aten.permute.default, b.call(aten.select.int, table, 1, index), [1, 0, 2])  # [kv, P, d]
    rows = b.call(aten.sym_size.int, like, 0)
    if heads != kv_heads:  # grouped-query attention: each kv head serves heads // kv_heads query heads
        states = b.call(aten.unsqueeze.default, states, 1)
        states = b.call(aten.expand.default, states, [kv_heads, heads // kv_heads, p, dim])
        states = b.call(aten.reshape.default, states, [heads, p, dim])
    states = b.call(aten.expand.default, b.call(aten.unsqueeze.default, states, 0), [rows, heads, p, dim])
    return b.call(aten.to.dtype, states, val.dtype)


def _attention(b: Builder, ctx: PassContext, m: Captures) -> None:
    node, layer = m["node"], m["layer"]
    b.adapter = ctx.prompt[0]
    args = _sdpa_args(node)
    p = ctx.prompt_config.num_virtual_tokens
    b.continue_after(node.prev)  # the prefix feeds the op
    table = _prefix_table(ctx, b)
    key, value = args["key"], args["value"]
    args["key"] = b.call(aten.cat.default, [_prefix_states(b, table, 2 * layer, key, ctx), key], 2)
    args["value"] = b.call(aten.cat.default, [_prefix_states(b, table, 2 * layer + 1, value, ctx), value], 2)
    mask = args.get("attn_mask")
    if mask is not None:
        args["attn_mask"] = _open_prefix(b, mask, ctx)
    elif args.get("is_causal"):
        args["attn_mask"] = _causal_with_prefix(b, args["query"], key, p)
        args["is_causal"] = False
    b.set_args(node, (), args)


def _prepend_columns(b: Builder, tensor: fx.Node, value, ctx: PassContext) -> fx.Node:
    """cat([full(..., P, value), tensor], -1): P key columns in front, other dims as the tensor's.

    Built once per mask: every layer shares the model's mask, so later layers reuse the first widening."""
    cache = ctx.scratch.setdefault("prefix_columns", {})
    if (tensor, value) not in cache:
        p = ctx.prompt_config.num_virtual_tokens
        dims = tensor.meta["val"].dim()
        first = b.call(aten.slice.Tensor, tensor, dims - 1, 0, 1)
        columns = b.call(aten.expand.default, b.call(aten.full_like.default, first, value), [-1] * (dims - 1) + [p])
        cache[(tensor, value)] = b.call(aten.cat.default, [columns, tensor], dims - 1)
    return cache[(tensor, value)]


def _open_prefix(b: Builder, mask: fx.Node, ctx: PassContext) -> fx.Node:
    """Prepend P visible key columns (True for boolean masks, 0 for additive ones)."""
    return _prepend_columns(b, mask, True if mask.meta["val"].dtype == torch.bool else 0.0, ctx)


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


def _eager_attention(b: Builder, ctx: PassContext, m: Captures) -> None:
    """Prepend this layer's prefix keys/values around the eager pattern and widen every mask on the way."""
    scores, output, layer = m["scores"], m["output"], m["layer"]
    b.adapter = ctx.prompt[0]
    query, key_t = scores.args[:2]
    b.continue_after(scores.prev)
    table = _prefix_table(ctx, b)
    key = key_t.args[0]
    key = b.call(aten.cat.default, [_prefix_states(b, table, 2 * layer, key, ctx), key], 2)
    b.set_args(scores, (query, b.call(aten.transpose.int, key, *key_t.args[1:])))
    for step, index, operand in m["masks"]:
        b.continue_after(step.prev)
        wide = _prepend_columns(b, operand, _visible_value(step.target, index, operand), ctx)
        b.set_arg(step, index, wide)
    probs, value = output.args[:2]
    b.continue_after(output.prev)
    value = b.call(aten.cat.default, [_prefix_states(b, table, 2 * layer + 1, value, ctx), value], 2)
    b.set_args(output, (probs, value))


PASS = Pass(
    NAME,
    rules=(
        Rule("positions", INPUT("position_ids"), _positions),
        Rule("attention", P(ATTENTION_OPS, where=_layer), _attention),
        Rule("eager_attention", Match(_eager_site, targets=SOFTMAX_OPS), _eager_attention),
    ),
    applies=lambda ctx: ctx.serves_prompt("PREFIX_TUNING"),
    validate=_validate,
)
