"""Merging folds s*B@A into the base weights; checked against PEFT and against the unmerged graph."""
from __future__ import annotations

import pytest
import torch
import transformers

import peftfx
from peftfx.methods.lora import lora_weights
from conftest import CONFIGS, batch
from oracle import twin_models

from peftfx.errors import UnsafeMergeError
from peftfx.rewrite import made_by


@pytest.mark.parametrize("name,config", [
    ("llama", dict(r=4, target_modules="all-linear")),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ("bert", dict(r=2, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all")),
])
def test_merge_unmerge_match_peft(name, config, load_model, tmp_path):
    ref, pm = twin_models(load_model, name, {"default": config}, tmp_path)
    kw = batch()
    base_before = {n: p.detach().clone() for n, p in pm.base_model.named_parameters()}
    with torch.no_grad():
        unmerged = pm(**kw).logits
        pm.merge_adapter()
        ref.merge_adapter()
        merged = pm(**kw).logits
        torch.testing.assert_close(merged, ref(**kw).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        assert not any(made_by(n, "lora") for n in pm.graph_module.graph.nodes)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm(**kw).logits, unmerged, atol=1e-5, rtol=1e-5)
    worst = max((p - base_before[n]).abs().max().item() for n, p in pm.base_model.named_parameters())
    assert worst < 1e-6  # unmerge restores the base weights to fp32 rounding


def test_fully_merged_lora_runs_the_base_graph(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    pm.eval()
    pm.merge_adapter()
    with pm.disable_adapter():
        pass  # PEFT semantics: disabling unmerges
    assert pm.merged_adapters == []
    pm.merge_adapter()
    gm = pm.graph_module
    assert not hasattr(gm, "peftfx")  # the plain captured graph, no adapter mounted


def test_merge_and_unload_gives_a_plain_model_that_saves(load_model, tmp_path, model_dirs):
    ref, pm = twin_models(load_model, "bert", {"default": dict(r=2, target_modules=["query"], task_type="SEQ_CLS")}, tmp_path / "a")
    kw = batch()
    with torch.no_grad():
        want = ref(**kw).logits
        plain = pm.merge_and_unload()
        assert type(plain) is CONFIGS["bert"][0]
        torch.testing.assert_close(plain(**kw).logits, want, atol=1e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    again = CONFIGS["bert"][0].from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**kw).logits, want, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in again.state_dict())


def test_merging_two_adapters_matches_peft(load_model, tmp_path):
    cfgs = {"default": dict(r=4, target_modules=["q_proj"]), "b": dict(r=2, target_modules=["q_proj", "o_proj"])}
    ref, pm = twin_models(load_model, "llama", cfgs, tmp_path)
    kw = batch()
    ref.base_model.set_adapter(["default", "b"])
    pm.set_adapter(["default", "b"])
    with torch.no_grad():
        want = ref(**kw).logits
        pm.merge_adapter()
        torch.testing.assert_close(pm(**kw).logits, want, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_nan_and_changes_nothing(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    _, b = lora_weights(pm.adapters, "default", "model.layers.1.self_attn.q_proj")
    with torch.no_grad():
        b[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in pm.base_model.named_parameters()}
    with pytest.raises(UnsafeMergeError, match="NaN/Inf"):
        pm.merge_adapter(safe_merge=True)
    assert pm.merged_adapters == []
    for n, p in pm.base_model.named_parameters():
        assert torch.equal(p, before[n]), n
