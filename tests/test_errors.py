"""Bad input fails early with a message that names the problem and the fix; nothing is half-applied."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftfx
from peftfx.errors import AdapterNotFoundError, CheckpointError, ConfigError, TargetNotFoundError


def test_no_target_matched_lists_closest_paths(load_model):
    with pytest.raises(TargetNotFoundError, match=r"q_prj.*Closest module paths: \[.*'q_proj'"):
        peftfx.apply(load_model("llama"), peftfx.LoraConfig(target_modules=["q_prj"]))


def test_layers_to_transform_that_excludes_everything_says_so(load_model):
    with pytest.raises(TargetNotFoundError, match="layers_to_transform=\\[9\\] may exclude every layer"):
        peftfx.apply(load_model("llama"), peftfx.LoraConfig(target_modules=["q_proj"], layers_to_transform=[9]))


@pytest.mark.parametrize("r", [0, -3])
def test_non_positive_rank(r):
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        peftfx.LoraConfig(r=r)


def test_rank_larger_than_layer(load_model):
    model = load_model("llama")  # hidden 64, so q_proj is 64x64
    with pytest.raises(ConfigError, match=r"rank r=65 is larger than layer 'model.layers.0.self_attn.q_proj' allows .*at most 64"):
        peftfx.apply(model, peftfx.LoraConfig(r=65, target_modules=["q_proj"]))
    assert all(p.requires_grad for p in model.parameters())  # nothing was changed


def _saved_adapter(load_model, tmp_path):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path))
    return tmp_path


def test_unknown_config_key(load_model, tmp_path):
    folder = _saved_adapter(load_model, tmp_path)
    cfg_path = folder / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["lora_alpah"] = 16
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"unknown config keys \['lora_alpah'\].*check for typos"):
        peftfx.load(load_model("llama"), str(folder))


def test_unsupported_peft_option_is_refused(load_model, tmp_path):
    folder = _saved_adapter(load_model, tmp_path)
    cfg_path = folder / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["use_qalora"] = True
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="use_qalora=True is a PEFT option peftfx does not support yet"):
        peftfx.load(load_model("llama"), str(folder))


def test_checkpoint_shape_mismatch_names_key_and_shapes(load_model, tmp_path):
    folder = _saved_adapter(load_model, tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    weights[key] = torch.zeros(4, 32)
    save_file(weights, folder / "adapter_model.safetensors")
    model = load_model("llama")
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(4, 32\) but the model needs \(4, 64\)"):
        peftfx.load(model, str(folder))
    assert all(p.requires_grad for p in model.parameters())  # the model was not touched


def test_checkpoint_with_unexpected_and_missing_keys(load_model, tmp_path):
    folder = _saved_adapter(load_model, tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 128)
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="match nothing in the model.*lora_embedding_A"):
        peftfx.load(load_model("llama"), str(folder))
    del weights["base_model.model.model.embed_tokens.lora_embedding_A"]
    del weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="missing.*layers.0.self_attn.q_proj.lora_B.weight"):
        peftfx.load(load_model("llama"), str(folder))


def test_path_that_does_not_exist(load_model, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(AdapterNotFoundError, match="does not exist"):
        peftfx.load(load_model("llama"), missing)


def test_repo_id_not_in_cache_is_a_clear_error(load_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = load_model("llama")
    start = time.perf_counter()
    with pytest.raises(AdapterNotFoundError, match="neither a local folder nor a hub adapter"):
        peftfx.load(model, "someone/not-cached-adapter")
    # HF_HUB_OFFLINE=1 (conftest) fails at once: huggingface_hub, which read it before it was set, retried for 23 s
    assert time.perf_counter() - start < 10


def test_folder_without_config(load_model, tmp_path):
    with pytest.raises(AdapterNotFoundError, match="has no adapter_config.json"):
        peftfx.load(load_model("llama"), str(tmp_path))


def test_bad_bias_and_init_values():
    with pytest.raises(ConfigError, match="bias must be one of"):
        peftfx.LoraConfig(bias="some")
    with pytest.raises(ConfigError, match="init_lora_weights='pissa' is not supported"):
        peftfx.LoraConfig(init_lora_weights="pissa")


def test_non_hf_model_needs_example_inputs():
    with pytest.raises(ConfigError, match="pass example_inputs"):
        peftfx.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), peftfx.LoraConfig(target_modules=["0"]))


def test_save_never_leaves_partial_files(load_model, tmp_path, monkeypatch):
    folder = _saved_adapter(load_model, tmp_path)
    before = (folder / "adapter_model.safetensors").read_bytes()
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))

    def failing_save(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("peftfx.io.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(str(folder))
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    # the saved files and peftfx's save store (peftfx/io.py), and no temporary file beside them
    assert sorted(os.listdir(folder)) == [".peftfx", "adapter_config.json", "adapter_model.safetensors"]
