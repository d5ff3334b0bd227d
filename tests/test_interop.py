"""PEFT interop: get/set_peft_model_state_dict against PEFT's on the same weights, PEFT's default
target modules for every model type, and PEFT checkpoints that target a tied lm_head."""
from __future__ import annotations

import peft
import pytest
import torch
import transformers
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file, save_file

import peftfx
from conftest import VOCAB, batch, perturb_trainable
from peftfx.config import DEFAULT_LORA_TARGETS
from peftfx.errors import CheckpointError


def logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


def test_default_targets_cover_every_peft_model_type():
    assert len(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) >= 40
    for model_type, modules in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items():
        assert model_type in DEFAULT_LORA_TARGETS, model_type
        ours = DEFAULT_LORA_TARGETS[model_type]
        if isinstance(modules, str):  # a regex (gemma4)
            assert ours == modules, model_type
        else:
            assert isinstance(ours, list) and sorted(ours) == sorted(modules), model_type


def test_state_dict_functions_match_peft_s(load_model, tmp_path):
    config = dict(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only", modules_to_save=["lm_head"])
    torch.manual_seed(0)
    ref = peft.get_peft_model(load_model("llama"), peft.LoraConfig(init_lora_weights=False, **config))
    perturb_trainable(ref)
    ref.save_pretrained(str(tmp_path))
    pm = peftfx.load(load_model("llama"), str(tmp_path))
    theirs = peft.get_peft_model_state_dict(ref)
    ours = peftfx.get_peft_model_state_dict(pm)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)
    from_state_dict = peftfx.get_peft_model_state_dict(pm, state_dict=pm.state_dict())
    assert sorted(from_state_dict) == sorted(theirs)

    # set: a fresh adapter of the same config takes PEFT's state dict and then gives PEFT's logits
    fresh = peftfx.apply(load_model("llama"), peftfx.LoraConfig(**config))
    result = peftfx.set_peft_model_state_dict(fresh, theirs)
    assert result.missing_keys == [] and result.unexpected_keys == []
    kw = batch()
    ref.eval()
    torch.testing.assert_close(logits(fresh, kw), logits(ref, kw), atol=1e-5, rtol=1e-5)

    # a partial state dict with a stray key: the same missing (adapter) and unexpected keys as PEFT's
    partial = {k: v for k, v in theirs.items() if "layers.1.self_attn.q_proj.lora_B" not in k}
    partial["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(2)
    ref_fresh = peft.get_peft_model(load_model("llama"), peft.LoraConfig(**config))
    their_result = peft.set_peft_model_state_dict(ref_fresh, partial)
    our_result = peftfx.set_peft_model_state_dict(peftfx.apply(load_model("llama"), peftfx.LoraConfig(**config)), partial)
    assert our_result.unexpected_keys == their_result.unexpected_keys
    assert our_result.missing_keys == [k for k in their_result.missing_keys if ".default." in k]
    assert our_result.missing_keys == ["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"]


def test_set_refuses_a_misshapen_tensor_and_changes_nothing(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in peftfx.get_peft_model_state_dict(pm).items()}
    bad = {k: torch.ones_like(v) for k, v in before.items()}
    key = next(k for k in bad if "lora_A" in k)
    bad[key] = torch.ones(2, 64)
    with pytest.raises(CheckpointError, match="do not fit adapter 'default'.*nothing was loaded"):
        peftfx.set_peft_model_state_dict(pm, bad)
    after = peftfx.get_peft_model_state_dict(pm)
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.warns(UserWarning, match="skipped tensors of another shape"):
        peftfx.set_peft_model_state_dict(pm, bad, ignore_mismatched_sizes=True)
    after = peftfx.get_peft_model_state_dict(pm)
    assert torch.equal(after[key], before[key]) and all(torch.equal(after[k], bad[k]) for k in before if k != key)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A Llama whose lm_head shares the input embedding (Llama-3.2, Qwen2.5-small, Gemma)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tied-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)

    def load():
        model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model
    return load


def test_peft_checkpoint_targeting_a_tied_lm_head_loads(tied_llama, tmp_path):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    torch.manual_seed(1)
    ref = peft.get_peft_model(tied_llama(), config).eval()
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        ref.save_pretrained(str(tmp_path))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in saved  # PEFT saves the tied weight
    kw = batch()
    pm = peftfx.load(tied_llama(), str(tmp_path))
    torch.testing.assert_close(logits(pm, kw), logits(ref, kw), atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        theirs = peft.get_peft_model_state_dict(ref)
    ours = peftfx.get_peft_model_state_dict(pm)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # the saved embedding is a base weight PEFT loads into the model: a changed one changes both
    saved["base_model.model.lm_head.base_layer.weight"] = saved["base_model.model.lm_head.base_layer.weight"] * 1.5
    save_file(saved, tmp_path / "adapter_model.safetensors")
    theirs = peft.PeftModel.from_pretrained(tied_llama(), str(tmp_path)).eval()
    pm = peftfx.load(tied_llama(), str(tmp_path))
    torch.testing.assert_close(logits(pm, kw), logits(theirs, kw), atol=1e-5, rtol=1e-5)
    with pm.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(logits(pm, kw), logits(theirs, kw), atol=1e-5, rtol=1e-5)
