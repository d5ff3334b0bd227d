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

import torch
from torch import fx

from peftfx.adapters import MOUNT
from peftfx.graph_inputs import add_keyword_input, remove_keyword_input
from peftfx.rewrite import Builder, Rule
from peftfx.virtual_tokens import input_embeddings

from .context import PassContext

aten = torch.ops.aten
NAME = "prompt"


def _is_input(name: str):
    def match(node: fx.Node, ctx: PassContext) -> bool:
        return (ctx.serves_prompt("PROMPT_TUNING")
                and node.op == "placeholder" and node.target == name)
    return match


def _attr_path(gm: fx.GraphModule, tensor: torch.Tensor) -> str:
    for name, value in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers()):
        if value is tensor:
            return name
    raise KeyError("the token embedding weight is not a tensor of the captured graph")


def _batch_and_pad(b: Builder, like: fx.Node, value, p: int) -> fx.Node:
    rows = b.call(aten.sym_size.int, like, 0)
    return b.call(aten.cat.default, [b.call(aten.new_full.default, like, [rows, p], value), like], 1)


def _embeds(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    """inputs_embeds := cat(prompt, embed(input_ids)) (or cat(prompt, the user's inputs_embeds))."""
    adapter, source = ctx.prompt
    b.adapter = adapter
    gm = node.graph.owning_module
    if source == "input_ids":
        ids = add_keyword_input(gm, "input_ids")
        b.continue_after(ids)
        embedding = input_embeddings(ctx.model)
        weight = b.get_attr(_attr_path(gm, embedding.weight))
        embeds = b.call(aten.embedding.default, weight, ids)
        scale = getattr(embedding, "embed_scale", None)
        if scale is not None:  # transformers' *ScaledWordEmbedding: embedding(ids) * embed_scale (Gemma, BioGPT)
            scale = scale.to(embedding.weight.dtype) if isinstance(scale, torch.Tensor) else scale
            embeds = b.call(aten.mul.Tensor, embeds, float(scale))
    else:
        embeds = node
    prompt = b.get_attr(f"{MOUNT}.{ctx.store.prompt_weight_path(adapter)}")
    rows = b.call(aten.sym_size.int, embeds, 0)
    prompt = b.call(aten.expand.default, b.call(aten.unsqueeze.default, prompt, 0), [rows, -1, -1])
    prompt = b.call(aten.to.dtype, prompt, node.meta["val"].dtype)
    b.replace_uses(node, b.call(aten.cat.default, [prompt, embeds], 1))
    if source == "input_ids":
        remove_keyword_input(gm, "inputs_embeds")


def _pad_with(value):
    def apply(node: fx.Node, ctx: PassContext, b: Builder) -> None:
        b.adapter = ctx.prompt[0]
        b.replace_uses(node, _batch_and_pad(b, node, value, ctx.prompt_config.num_virtual_tokens))
    return apply


def _causal_labels(node: fx.Node, ctx: PassContext) -> bool:
    return _is_input("labels")(node, ctx) and ctx.prompt_config.task_type == "CAUSAL_LM"


RULES = (
    Rule("embeds", _is_input("inputs_embeds"), _embeds),
    Rule("mask", _is_input("attention_mask"), _pad_with(1)),
    Rule("labels", _causal_labels, _pad_with(-100)),
    Rule("token_types", _is_input("token_type_ids"), _pad_with(0)),
)
