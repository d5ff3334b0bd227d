"""Checkpoint files: PEFT's layout and keys, .bin reading, hub repo ids through the local cache."""
from __future__ import annotations

import json
import os
import shutil

import peft
import torch
from safetensors.torch import load_file

import peftfx
from conftest import batch, perturb_trainable


def test_saved_keys_and_config_are_peft_s(load_model, tmp_path):
    kwargs = dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="lora_only")
    pm = peftfx.apply(load_model("bert"), peftfx.LoraConfig(**kwargs))
    pm.save_pretrained(str(tmp_path / "fx"))
    ref = peft.get_peft_model(load_model("bert"), peft.LoraConfig(**kwargs))
    ref.save_pretrained(str(tmp_path / "peft"))
    ours = load_file(tmp_path / "fx" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    our_cfg = json.loads((tmp_path / "fx" / "adapter_config.json").read_text())
    their_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "bias", "task_type", "peft_type", "inference_mode", "use_rslora"):
        assert our_cfg[field] == their_cfg[field], field
    assert sorted(our_cfg["target_modules"]) == sorted(their_cfg["target_modules"])
    assert set(their_cfg) <= set(our_cfg) | {"peft_version", "runtime_config"}


def test_non_default_adapters_go_to_subfolders_like_peft(load_model, tmp_path):
    ref = peft.get_peft_model(load_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    ref.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    perturb_trainable(ref)  # only the active adapter is trainable; make "other" non-trivial too
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".other." in n:
                p.add_(0.05)
    ref.save_pretrained(str(tmp_path), selected_adapters=["default", "other"])
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")

    pm = peftfx.load(load_model("llama"), str(tmp_path))
    pm.load_adapter(str(tmp_path / "other"), adapter_name="other")
    kw = batch()
    ref.eval(), pm.eval()
    with torch.no_grad():
        for name in ("default", "other"):
            ref.set_adapter(name)
            pm.set_adapter(name)
            torch.testing.assert_close(pm(**kw).logits, ref(**kw).logits, atol=1e-5, rtol=1e-5)

    out = tmp_path / "resaved"
    pm.save_pretrained(str(out))
    assert sorted(os.listdir(out)) == [".peftfx", "adapter_config.json", "adapter_model.safetensors", "other"]
    again = peft.PeftModel.from_pretrained(load_model("llama"), str(out / "other"), adapter_name="other").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**kw).logits, ref(**kw).logits, atol=1e-5, rtol=1e-5)


def test_reads_bin_checkpoints(load_model, tmp_path):
    ref = peft.get_peft_model(load_model("gpt2"), peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    ref.save_pretrained(str(tmp_path), safe_serialization=False)
    assert os.path.isfile(tmp_path / "adapter_model.bin")
    pm = peftfx.load(load_model("gpt2"), str(tmp_path))
    kw = batch()
    ref.eval(), pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**kw).logits, ref(**kw).logits, atol=1e-5, rtol=1e-5)


def test_loads_a_hub_repo_id_from_the_local_cache(load_model, tmp_path, monkeypatch):
    """A pre-populated huggingface_hub cache (the layout hf_hub_download writes); nothing downloads."""
    src = tmp_path / "src"
    ref = peft.get_peft_model(load_model("llama"), peft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    ref.save_pretrained(str(src))
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-adapter"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(src / name, snapshot / name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    pm = peftfx.load(load_model("llama"), "someone/tiny-adapter")
    kw = batch()
    ref.eval(), pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(**kw).logits, ref(**kw).logits, atol=1e-5, rtol=1e-5)


def test_loaded_adapter_is_frozen_unless_trainable(load_model, tmp_path):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path))
    frozen = peftfx.load(load_model("llama"), str(tmp_path))
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = peftfx.load(load_model("llama"), str(tmp_path), is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
