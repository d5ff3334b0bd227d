"""Same numbers as HF PEFT (the oracle), both directions of checkpoint exchange."""
from __future__ import annotations

import peft
import pytest
import torch

import peftfx
from peftfx.methods.lora import lora_weights
from conftest import batch, perturb_trainable

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "llama-list": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-regex": ("llama", dict(r=4, lora_alpha=16, target_modules=r".*\.layers\.[02]\.self_attn\.(q|k)_proj")),
    "llama-all-linear-exclude": ("llama", dict(r=4, target_modules="all-linear", exclude_modules=["k_proj", "down_proj"])),
    "llama-layers-patterns-rslora": ("llama", dict(
        r=8, lora_alpha=4, target_modules=ALL7, layers_to_transform=[0, 2], use_rslora=True,
        rank_pattern={"v_proj": 2, "layers.2.mlp.up_proj": 3}, alpha_pattern={"o_proj": 12})),
    "llama-layers-pattern-int": ("llama", dict(r=2, target_modules=ALL7, layers_to_transform=1, layers_pattern="layers")),
    "gpt2-conv1d-bias-all": ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, bias="all")),
    "gpt2-all-linear": ("gpt2", dict(r=2, lora_alpha=3, target_modules="all-linear", fan_in_fan_out=True)),
    "bert-seqcls-lora-only-bias": ("bert", dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="lora_only")),
    "bert-seqcls-all-linear": ("bert", dict(r=2, target_modules="all-linear", task_type="SEQ_CLS")),
    "qwen2-mixed-bias-all": ("qwen2", dict(r=4, target_modules="all-linear", bias="all")),
}


def _inputs():
    return [batch(3, 9), batch(1, 1, pad=False), batch(2, 17, seed=5)]


def _assert_same_logits(pm, ref):
    pm.eval(), ref.eval()
    for kw in _inputs():
        with torch.no_grad():
            got, want = pm(**kw).logits, ref(**kw).logits
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_checkpoint_loads_in_peftfx(case, load_model, tmp_path):
    name, kwargs = CASES[case]
    ref = peft.get_peft_model(load_model(name), peft.LoraConfig(init_lora_weights=False, **kwargs))
    perturb_trainable(ref)  # biases and classifier heads too, so their saving is checked
    ref.save_pretrained(tmp_path)
    pm = peftfx.load(load_model(name), str(tmp_path))
    _assert_same_logits(pm, ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftfx_checkpoint_loads_in_peft(case, load_model, tmp_path):
    name, kwargs = CASES[case]
    pm = peftfx.apply(load_model(name), peftfx.LoraConfig(init_lora_weights=False, **kwargs))
    perturb_trainable(pm)
    pm.save_pretrained(str(tmp_path))
    ref = peft.PeftModel.from_pretrained(load_model(name), str(tmp_path))
    _assert_same_logits(pm, ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainable_parameter_counts_match_peft(case, load_model):
    name, kwargs = CASES[case]
    ref = peft.get_peft_model(load_model(name), peft.LoraConfig(**kwargs))
    pm = peftfx.apply(load_model(name), peft.LoraConfig(**kwargs))  # a peft config object is accepted
    assert pm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


def test_print_trainable_parameters_matches_peft(load_model, capsys):
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(load_model("llama"), peft.LoraConfig(**kwargs)).print_trainable_parameters()
    want = capsys.readouterr().out
    peftfx.apply(load_model("llama"), peftfx.LoraConfig(**kwargs)).print_trainable_parameters()
    assert capsys.readouterr().out == want


def test_default_init_is_identity_and_gaussian_too(load_model):
    base = load_model("llama")
    kw = batch()
    with torch.no_grad():
        want = base(**kw).logits
    for init in (True, "gaussian"):
        pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(target_modules=["q_proj"], init_lora_weights=init))
        with torch.no_grad():
            torch.testing.assert_close(pm(**kw).logits, want, atol=0, rtol=0)
        a, b = lora_weights(pm.adapters, "default", "model.layers.0.self_attn.q_proj")
        assert a.abs().sum() > 0 and b.abs().sum() == 0


def test_default_targets_follow_peft_when_none_given(load_model):
    ref = peft.get_peft_model(load_model("gpt2"), peft.LoraConfig(r=2))
    pm = peftfx.apply(load_model("gpt2"), peftfx.LoraConfig(r=2))
    peft_keys = sorted(n.replace("base_model.model.", "").split(".lora_A")[0]
                       for n, _ in ref.named_parameters() if "lora_A" in n)
    assert sorted(pm.adapters.sites["default"]) == peft_keys
