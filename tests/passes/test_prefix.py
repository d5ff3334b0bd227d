"""passes/prefix.py alone on tiny exported models: rules `positions` (the real tokens' positions after
the prefix), `attention` (the prefix in front of every scaled_dot_product_attention's keys and values)
and `eager_attention` (the same around softmax(q·kᵀ)·v), against HF PEFT's prefix tuning and, for a causal
attention op, the formula written out by hand."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

peft = pytest.importorskip("peft")

import peftfx  # noqa: E402
from peftfx.errors import ConfigError  # noqa: E402
from peftfx.passes import prefix  # noqa: E402
from peftfx.rewrite import MOUNT, PassContext  # noqa: E402
from peftfx.rewrite.graph_inputs import keyword_inputs  # noqa: E402

from .helpers import aten, batch, made, made_nodes, perturb_trainable, run, tiny_hf, variant_setup  # noqa: E402

P, LAYERS, L = 3, 2, 5
SDPA = aten.scaled_dot_product_attention.default


def _twins(attn, folder):
    """(PEFT's prefix-tuned llama, peftfx's loaded from its checkpoint): 2 layers, 4 heads over 2 KV heads."""
    ref = peft.get_peft_model(tiny_hf("llama", attn=attn, num_hidden_layers=LAYERS),
                              peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    perturb_trainable(ref, scale=1.0)
    ref.eval().save_pretrained(str(folder))
    return ref, peftfx.load(tiny_hf("llama", attn=attn, num_hidden_layers=LAYERS), str(folder))


def _variant(pm, inputs, **changes):
    named = pm.state.capturer.prepare_inputs((), inputs)
    capture, call, prompt_part = pm.state.capture_for(named, training=False)
    gm, ctx = variant_setup(pm, capture, pm.state.spec_for(capture, prompt_part), **changes)
    return gm, ctx, call


def _inputs(pad=True):
    inputs = batch(b=2, s=L, pad=pad)
    inputs["labels"] = inputs["input_ids"]
    return inputs


def _assert_same(gm, call, ref, inputs):
    with torch.no_grad():
        got, want = gm(**call), ref(**inputs)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


def made_by_rule(node, rule):
    return node in made_nodes(node.graph.owning_module, rule)


@pytest.fixture(scope="module")
def sdpa(tmp_path_factory):
    return _twins("sdpa", tmp_path_factory.mktemp("prefix-sdpa"))


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return _twins("eager", tmp_path_factory.mktemp("prefix-eager"))


def test_positions_and_attention(sdpa):
    ref, pm = sdpa
    inputs = _inputs()
    gm, ctx, call = _variant(pm, inputs)
    assert "position_ids" in keyword_inputs(gm)  # captured with PEFT's positions P..P+L-1
    assert run(gm, ctx, prefix.PASS) == [1 + LAYERS]
    assert "position_ids" not in keyword_inputs(gm)  # positions: computed in the graph
    positions = made(gm, "prefix.positions")
    assert positions[aten.arange.start] == 1 and aten.cumsum.default not in positions
    attention = made(gm, "prefix.attention")
    assert attention[aten.cat.default] == 2 * LAYERS + 1  # keys and values per layer, the mask widened once
    assert attention["get_attr"] == 1  # the prefix table, read once
    for node in (n for n in gm.graph.nodes if n.target is SDPA):
        assert all(made_by_rule(node.kwargs[name], "prefix.attention") for name in ("key", "value", "attn_mask"))
    assert not made(gm, "prefix.eager_attention")
    _assert_same(gm, call, ref, inputs)


def test_positions_counted_in_the_mask(sdpa):
    """Models that count positions in the attention mask (OPT) get cumsum(cat(ones(P), mask)) - 1; without
    padding these are PEFT's P..P+L-1 too, so llama's logits stay PEFT's."""
    ref, pm = sdpa
    inputs = _inputs(pad=False)
    gm, ctx, call = _variant(pm, inputs, positions_from_mask=True)
    run(gm, ctx, prefix.PASS)
    positions = made(gm, "prefix.positions")
    assert positions[aten.cumsum.default] == 1 and aten.arange.start not in positions
    _assert_same(gm, call, ref, inputs)


def test_eager_attention(eager):
    ref, pm = eager
    inputs = _inputs()
    gm, ctx, call = _variant(pm, inputs)
    assert not any(n.target is SDPA for n in gm.graph.nodes)
    sites = [prefix.eager_attention(n) for n in gm.graph.nodes if n.target in prefix.SOFTMAX_OPS]
    assert len(sites) == LAYERS and all(sites)
    assert run(gm, ctx, prefix.PASS) == [1 + LAYERS]
    counts = made(gm, "prefix.eager_attention")
    assert counts[aten.cat.default] == 2 * LAYERS + 1 and counts[aten.transpose.int] == LAYERS
    assert not made(gm, "prefix.attention")
    for site in sites:  # q·kᵀ reads the widened keys, probs·v the widened values
        assert made_by_rule(site.scores.args[1], "prefix.eager_attention")
        assert made_by_rule(site.output.args[1], "prefix.eager_attention")
    _assert_same(gm, call, ref, inputs)


class CausalAttention(nn.Module):
    """Two attention layers with is_causal=True and no mask (4 query heads, keys and values as given)."""

    def forward(self, q, k, v):
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(h, k, v, is_causal=True)


def test_attention_writes_a_causal_mask_with_the_prefix_open(sdpa):
    """No mask and is_causal: the prefix columns are visible to every query, later real keys are not.
    The expected output repeats the prefix's 2 KV heads for the 4 query heads by hand."""
    _, pm = sdpa
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, L, 16, generator=g) for _ in range(3))
    gm = torch.export.export(CausalAttention(), (q, k, v), strict=False).module()
    gm.add_module(MOUNT, pm.adapters)
    ctx = PassContext(model=pm.base_model, store=pm.adapters, prompt=("default", "input_ids"),
                      prompt_kind="PREFIX_TUNING")
    assert run(gm, ctx, prefix.PASS) == [LAYERS]
    assert all(not n.kwargs.get("is_causal") and n.kwargs["attn_mask"] is not None
               for n in gm.graph.nodes if n.target is SDPA)
    table = pm.adapters.prompts["default"].embedding.weight.detach().view(P, 2 * LAYERS, 2, 16)

    def prefixed(t, index):
        states = table[:, index].permute(1, 0, 2).repeat_interleave(2, dim=0)  # [4, P, 16]
        return torch.cat([states.expand(t.shape[0], -1, -1, -1), t], 2)
    visible = torch.arange(P + L)[None, :] <= torch.arange(L)[:, None] + P
    h = F.scaled_dot_product_attention(q, prefixed(k, 0), prefixed(v, 1), attn_mask=visible)
    want = F.scaled_dot_product_attention(h, prefixed(k, 2), prefixed(v, 3), attn_mask=visible)
    with torch.no_grad():
        torch.testing.assert_close(gm(q, k, v), want, atol=1e-5, rtol=1e-5)


def test_applies_only_to_prefix_tuning_variants(sdpa):
    _, pm = sdpa
    for changes in ({"prompt": ()}, {"prompt_kind": "PROMPT_TUNING"}):
        gm, ctx, _ = _variant(pm, _inputs(), **changes)
        before = str(gm.graph)
        assert run(gm, ctx, prefix.PASS) == [0] and str(gm.graph) == before, changes


@pytest.mark.parametrize("change,message", [
    (dict(num_layers=3), r"prefix tuning found 2 attention layers in the graph \(scaled_dot_product_attention ops "
                         r"or eager softmax\(q·kᵀ\)·v patterns\) but the config has num_layers=3"),
    (dict(num_attention_heads=3), r"prefix tuning: attention layer has 4 heads of size 16, the prefix 3 heads of "
                                  r"size 10; set num_attention_heads/token_dim to match the model"),
])
def test_validate_refuses_layers_it_cannot_extend(sdpa, monkeypatch, change, message):
    _, pm = sdpa
    gm, ctx, _ = _variant(pm, _inputs())
    monkeypatch.setitem(pm.adapters.configs, "default", dataclasses.replace(pm.adapters.configs["default"], **change))
    before = str(gm.graph)
    with pytest.raises(ConfigError, match=message):
        run(gm, ctx, prefix.PASS)
    assert str(gm.graph) == before  # refused before any node changed


class BooleanScaledAttention(nn.Module):
    """Eager attention whose scores are multiplied by a boolean mask: no prefix column value keeps it."""

    def forward(self, q, k, v, keep):
        scores = torch.matmul(q, k.transpose(2, 3)) * keep
        return torch.matmul(scores.softmax(-1), v)


def test_validate_refuses_a_score_operand_it_cannot_extend():
    q, k, v = (torch.randn(2, 2, 3, 4) for _ in range(3))
    keep = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    gm = torch.export.export(BooleanScaledAttention(), (q, k, v, keep), strict=False).module()
    config = SimpleNamespace(num_layers=1, num_attention_heads=2, kv_head_dim=4, num_virtual_tokens=2)
    ctx = PassContext(store=SimpleNamespace(configs={"p": config}), prompt=("p", "input_ids"),
                      prompt_kind="PREFIX_TUNING")
    with pytest.raises(ConfigError, match=r"prefix tuning cannot extend the attention-score operand keep of "
                                          r"aten.mul.Tensor; load the model with attn_implementation='sdpa'"):
        run(gm, ctx, prefix.PASS)
