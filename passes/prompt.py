"""Prompt tuning: P learned embeddings in front of the token embeddings.

The variant starts from a base graph captured with `inputs_embeds` of length P+L, so every size inside
follows the longer sequence (positions 0..P+L-1, a mask over P+L keys, logits of length P+L). This pass
rewrites the graph's inputs back to the user's:

Before:  forward(inputs_embeds[B, P+L, H], attention_mask[B, P+L], labels[B, P+L])
After:   forward(input_ids[B, L], attention_mask[B, L], labels[B, L])
         inputs_embeds = cat([prompt.expand(B, P, H), embedding(W_tok, input_ids)], 1)
         attention_mask = cat([ones(B, P), attention_mask], 1)
         labels = cat([full(B, P, -100), labels], 1)        # causal LMs only, as in PEFT
         token_type_ids = cat([zeros(B, P), token_type_ids], 1)
"""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import fx

from peftfx.rewrite import INPUT, Builder, Captures, Pass, PassContext, Rule, store_path
from peftfx.rewrite.graph_inputs import add_keyword_input, remove_keyword_input

aten = torch.ops.aten
NAME = "prompt"


def _attr_path(gm: fx.GraphModule, tensor: torch.Tensor) -> Optional[str]:
    for name, value in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers()):
        if value is tensor:
            return name
    return None


def _validate(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Token ids are embedded with the model's own embedding weight, which the graph must read."""
    if ctx.prompt[1] == "input_ids" and _attr_path(gm, ctx.model.get_input_embeddings().weight) is None:
        raise KeyError("the token embedding weight is not a tensor of the captured graph")


def _batch_and_pad(b: Builder, like: fx.Node, value, p: int) -> fx.Node:
    rows = b.call(aten.sym_size.int, like, 0)
    return b.call(aten.cat.default, [b.call(aten.new_full.default, like, [rows, p], value), like], 1)


def _embeds(b: Builder, ctx: PassContext, m: Captures) -> None:
    """inputs_embeds := cat(prompt, embed(input_ids)) (or cat(prompt, the user's inputs_embeds))."""
    node = m["node"]
    adapter, source = ctx.prompt
    b.adapter = adapter
    gm = b.gm
    if source == "input_ids":
        ids = add_keyword_input(gm, "input_ids")
        b.continue_after(ids)
        embedding = ctx.model.get_input_embeddings()  # checked when the adapter was added
        weight = b.get_attr(cast(str, _attr_path(gm, embedding.weight)))  # _validate found it
        embeds = b.call(aten.embedding.default, weight, ids)
        scale = getattr(embedding, "embed_scale", None)
        if scale is not None:  # transformers' *ScaledWordEmbedding: embedding(ids) * embed_scale (Gemma, BioGPT)
            scale = scale.to(embedding.weight.dtype) if isinstance(scale, torch.Tensor) else scale
            embeds = b.call(aten.mul.Tensor, embeds, float(scale))
    else:
        embeds = node
    prompt = b.get_attr(store_path(ctx.store.prompt_weight_path(adapter)))
    rows = b.call(aten.sym_size.int, embeds, 0)
    prompt = b.call(aten.expand.default, b.call(aten.unsqueeze.default, prompt, 0), [rows, -1, -1])
    prompt = b.call(aten.to.dtype, prompt, node.meta["val"].dtype)
    b.replace_uses(node, b.call(aten.cat.default, [prompt, embeds], 1))
    if source == "input_ids":
        remove_keyword_input(gm, "inputs_embeds")


def _pad_with(value):
    def apply(b: Builder, ctx: PassContext, m: Captures) -> None:
        node = m["node"]
        b.adapter = ctx.prompt[0]
        b.replace_uses(node, _batch_and_pad(b, node, value, ctx.prompt_config.num_virtual_tokens))

    return apply


def _causal(node: fx.Node, ctx: PassContext) -> bool:
    return ctx.prompt_config.task_type == "CAUSAL_LM"


PASS = Pass(
    NAME,
    rules=(
        Rule("embeds", INPUT("inputs_embeds"), _embeds),
        Rule("mask", INPUT("attention_mask"), _pad_with(1)),
        Rule("labels", INPUT("labels", where=_causal), _pad_with(-100)),
        Rule("token_types", INPUT("token_type_ids"), _pad_with(0)),
    ),
    applies=lambda ctx: ctx.serves_prompt("PROMPT_TUNING"),
    validate=_validate,
)
