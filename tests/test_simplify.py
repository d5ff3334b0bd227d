"""passes/simplify.py and peftfx/bindings.py: the simplified graph, and its forward through direct torch
bindings, compute bit for bit what the exported graph computes (and what HF PEFT computes)."""
from __future__ import annotations

import pytest
import torch
from torch import fx

from conftest import batch
from oracle import twin_models
from peftfx.state import variants
from peftfx.bindings import BINDINGS, eager_forward, lowered_graph
from peftfx.generate import decode_capture
from peftfx.passes import simplify
from peftfx.rewrite import PassContext

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "o_proj"],
           "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _noop_casts(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in simplify._CASTS
            and simplify._is_noop_cast(n, PassContext(model=None, store=None))]


def _without_simplify(monkeypatch, pm) -> None:
    monkeypatch.setattr(variants, "PIPELINE", tuple(p for p in variants.PIPELINE if p is not simplify.PASS))
    pm.state.variants.clear()


@pytest.mark.parametrize("name", list(TARGETS))
def test_simplified_eval_graph_is_bit_identical(load_model, tmp_path, monkeypatch, name):
    ref, pm = twin_models(load_model, name, {"default": dict(r=4, lora_alpha=8, target_modules=TARGETS[name])},
                          tmp_path)
    inputs = batch()
    with torch.no_grad():
        simplified = _logits(pm(**inputs))
        torch.testing.assert_close(simplified, _logits(ref(**inputs)), atol=1e-5, rtol=1e-5)
    gm = pm.graph_module
    assert not _noop_casts(gm)
    grouped = [n for n in gm.graph.nodes if n.target is SDPA and n.kwargs.get("enable_gqa")]
    if name in ("llama", "qwen2"):  # 4 query heads over 2 KV heads: every layer reads the grouped heads
        assert len(grouped) == load_model(name).config.num_hidden_layers
        assert not any(n.target is aten.expand.default for s in grouped for n in s.args[1:3])
    else:
        assert not grouped
    _without_simplify(monkeypatch, pm)
    with torch.no_grad():
        plain = _logits(pm(**inputs))
    assert _noop_casts(pm.graph_module)
    assert torch.equal(simplified, plain)


def test_training_variants_are_not_simplified(load_model, tmp_path):
    _, pm = twin_models(load_model, "llama", {"default": dict(r=4, lora_alpha=8, target_modules=["q_proj"])},
                        tmp_path)
    pm.train()
    pm(**batch())
    gm = pm.graph_module
    assert _noop_casts(gm)
    assert not any(n.target is SDPA and n.kwargs.get("enable_gqa") for n in gm.graph.nodes)


def test_decode_graph_reads_grouped_heads(load_model, tmp_path, monkeypatch):
    ref, pm = twin_models(load_model, "llama", {"default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])},
                          tmp_path)
    inputs = batch(b=2, s=6)
    tokens = pm.generate(**inputs, max_new_tokens=5)
    assert torch.equal(tokens, ref.generate(**inputs, max_new_tokens=5, do_sample=False))
    gm = pm.state.variant(decode_capture(pm, "input_ids"))[0]
    assert sum(bool(n.target is SDPA and n.kwargs.get("enable_gqa")) for n in gm.graph.nodes) == 3
    assert not _noop_casts(gm)
    _without_simplify(monkeypatch, pm)
    assert torch.equal(pm.generate(**inputs, max_new_tokens=5), tokens)


def _graph(written: bool) -> fx.Node:
    """x * 1 viewed as [2, 2], and (when `written`) an in-place add on that view; returns the mul node."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(4, device="meta")
    mul = graph.call_function(aten.mul.Tensor, (x, 1))
    mul.meta["val"] = torch.empty(4, device="meta")
    view = graph.call_function(aten.view.default, (mul, [2, 2]))
    if written:
        graph.call_function(aten.add_.Tensor, (view, 1))
    graph.output(view)
    return mul


def test_identity_is_kept_when_its_result_is_written_in_place():
    ctx = PassContext(model=None, store=None)
    assert simplify._is_identity(_graph(written=False), ctx)
    assert not simplify._is_identity(_graph(written=True), ctx)  # dropping it would write into x


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_direct_bindings_match_the_aten_graph(load_model, tmp_path, name):
    """The lowered forward gives bit-identical outputs and gradients to the GraphModule's own."""
    _, pm = twin_models(load_model, name, {"default": dict(r=4, lora_alpha=8, target_modules=TARGETS[name])},
                        tmp_path)
    for p in pm.adapters.parameters():
        p.requires_grad_(True)
    inputs = batch()
    for training in (False, True):
        pm.train(training)
        torch.manual_seed(0)
        pm(**inputs)  # builds the variant
        gm = pm.graph_module
        lowered, count = lowered_graph(gm.graph)
        assert count > 0.5 * sum(n.op == "call_function" for n in gm.graph.nodes)
        assert not any(n.target in BINDINGS and not n.kwargs for n in lowered.nodes)
        results = []
        named = pm.state.capturer.prepare_inputs((), inputs)
        for run in (gm.forward, eager_forward(gm)):  # the variant cache hands pm the second callable
            pm.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            with torch.set_grad_enabled(training):
                out = _logits(run(**named))
            if training:
                out.float().pow(2).mean().backward()
            grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
            results.append((out.detach(), grads))
        (aten_out, aten_grads), (bound_out, bound_grads) = results
        assert torch.equal(aten_out, bound_out)
        assert aten_grads.keys() == bound_grads.keys() and (bool(aten_grads) == training)
        assert all(torch.equal(aten_grads[n], bound_grads[n]) for n in aten_grads)
