"""Many adapters on one model: switching, summing, deleting, disabling, with PEFT as the oracle."""
from __future__ import annotations

import pytest
import torch

import peftfx
from conftest import batch
from oracle import twin_models

CONFIGS = {
    "default": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=2, lora_alpha=6, target_modules=["v_proj", "down_proj"]),
    "c": dict(r=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
}


def _same(pm, ref, kw):
    with torch.no_grad():
        torch.testing.assert_close(pm(**kw).logits, ref(**kw).logits, atol=1e-5, rtol=1e-5)


@pytest.fixture
def twins(load_model, tmp_path):
    return twin_models(load_model, "llama", CONFIGS, tmp_path)


def test_switch_sum_and_disable_match_peft(twins):
    ref, pm = twins
    kw = batch()
    for active in (["b"], ["default"], ["c"], ["default", "b"], ["b", "c", "default"]):
        ref.base_model.set_adapter(active)
        pm.set_adapter(active)
        assert pm.active_adapters == active
        _same(pm, ref, kw)
        with ref.disable_adapter(), pm.disable_adapter():
            _same(pm, ref, kw)


def test_inactive_adapters_are_frozen(twins):
    _, pm = twins
    for name in ("default", "b", "c"):
        pm.adapters.set_trainable(name, True)  # as if loaded with is_trainable=True
        pm.adapters.configs[name].inference_mode = False
    pm.set_adapter("b")
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".b.weight" in n for n in trainable)


def test_delete_adapter_like_peft(twins):
    ref, pm = twins
    kw = batch()
    ref.base_model.set_adapter(["b", "c"])
    pm.set_adapter(["b", "c"])
    ref.delete_adapter("b")
    pm.delete_adapter("b")
    assert pm.active_adapters == ref.active_adapters == ["c"]
    _same(pm, ref, kw)
    ref.delete_adapter("c")
    pm.delete_adapter("c")
    assert pm.active_adapters == list(ref.base_model.active_adapters) == ["default"]
    _same(pm, ref, kw)
    assert list(pm.peft_config) == ["default"]
    assert not any(".c." in n or ".b." in n for n, _ in pm.named_parameters())


def test_switching_is_a_cache_lookup(twins):
    _, pm = twins
    kw = batch()
    graphs = {}
    for name in ("default", "b", "default", "b"):
        pm.set_adapter(name)
        pm(**kw)
        graphs.setdefault(name, set()).add(id(pm.graph_module))
    assert all(len(ids) == 1 for ids in graphs.values())


def test_errors_name_the_problem(twins):
    _, pm = twins
    with pytest.raises(peftfx.ConfigError, match=r"unknown adapter\(s\) \['zz'\]"):
        pm.set_adapter("zz")
    with pytest.raises(peftfx.ConfigError, match="exists already"):
        pm.add_adapter("b", peftfx.LoraConfig(target_modules=["q_proj"]))
