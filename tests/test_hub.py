"""The hub: PEFT's download arguments on a local hub cache (HF_HUB_OFFLINE=1), push_to_hub with the
upload intercepted at huggingface_hub's HfApi, and AutoPeftModel against PEFT's. Nothing touches the
network: the cache is laid out as huggingface_hub lays it out (blobs, snapshots of links, refs)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import huggingface_hub
import peft
import pytest
import torch
import transformers
from huggingface_hub import ModelCard

import peftfx
from conftest import batch
from peftfx.errors import AdapterNotFoundError, ConfigError

COMMIT_1 = "1111111111111111111111111111111111111111"
COMMIT_2 = "2222222222222222222222222222222222222222"


def cache_repo(cache, repo_id: str, commit: str, files: dict[str, str], refs: tuple[str, ...] = ("main",)) -> None:
    """Put `files` (path in repo -> local file) into a hub cache as hf_hub_download leaves them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    for name, src in files.items():
        data = open(src, "rb").read()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)


def adapter_files(folder, prefix: str = "") -> dict[str, str]:
    return {f"{prefix}{n}": os.path.join(folder, n) for n in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A tmp HF_HOME whose hub cache is huggingface_hub's default, with HF_HUB_OFFLINE=1 (huggingface_hub
    reads both at import, so its constants are set too)."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def peft_adapter(load_model, folder, seed: int, **fields):
    torch.manual_seed(seed)
    ref = peft.get_peft_model(load_model("llama"), peft.LoraConfig(init_lora_weights=False, **fields))
    ref.save_pretrained(str(folder))
    return ref.eval()


def logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


def test_hub_kwargs_on_a_local_cache(load_model, tmp_path, offline_hub):
    ref1 = peft_adapter(load_model, tmp_path / "a1", 1, r=4, target_modules=["q_proj"])
    ref2 = peft_adapter(load_model, tmp_path / "a2", 2, r=2, target_modules=["v_proj"])
    ref3 = peft_adapter(load_model, tmp_path / "a3", 3, r=3, target_modules=["o_proj"])
    cache_repo(offline_hub, "someone/adapter", COMMIT_1, {**adapter_files(tmp_path / "a1"),
                                                          **adapter_files(tmp_path / "a3", "sub/")})
    cache_repo(offline_hub, "someone/adapter", COMMIT_2, adapter_files(tmp_path / "a2"), refs=("v2",))
    other_cache = tmp_path / "elsewhere"
    cache_repo(other_cache, "someone/adapter", COMMIT_2, adapter_files(tmp_path / "a2"))
    kw = batch()

    cases = [  # (hub kwargs, expected adapter, PEFT 0.21 handles it too)
        ({"revision": "v2"}, ref2, True),
        ({"subfolder": "sub"}, ref3, False),  # PEFT offline looks for sub/sub/adapter_model.safetensors
        ({"cache_dir": str(other_cache)}, ref2, True),  # that cache's main is the v2 adapter
        ({"use_auth_token": False, "force_download": False}, ref1, False),  # PEFT passes use_auth_token on
        ({}, ref1, True),
    ]
    # peftfx.load takes them; then one model loads each case as another adapter (one capture in all)
    pm = peftfx.load(load_model("llama"), "someone/adapter", revision=COMMIT_1, local_files_only=True, token="hf_x")
    torch.testing.assert_close(logits(pm, kw), logits(ref1, kw), atol=1e-5, rtol=1e-5)
    theirs = peft.PeftModel.from_pretrained(load_model("llama"), "someone/adapter", revision=COMMIT_1).eval()
    for i, (kwargs, ref, peft_too) in enumerate(cases):
        pm.load_adapter("someone/adapter", f"case{i}", **kwargs)
        pm.set_adapter(f"case{i}")
        torch.testing.assert_close(logits(pm, kw), logits(ref, kw), atol=1e-5, rtol=1e-5, msg=str(kwargs))
        if peft_too:
            theirs.load_adapter("someone/adapter", f"case{i}", **kwargs)
            theirs.set_adapter(f"case{i}")
            torch.testing.assert_close(logits(pm, kw), logits(theirs, kw), atol=1e-5, rtol=1e-5, msg=str(kwargs))

    with pytest.raises(ConfigError, match=r"unknown keyword argument\(s\) \['cache_dri'\]"):
        peftfx.load(load_model("llama"), "someone/adapter", cache_dri=str(other_cache))
    with pytest.raises(ConfigError, match=r"unknown keyword argument\(s\) \['revison'\]"):
        peftfx.load(load_model("llama"), str(tmp_path / "a1"), revison="v2")  # a local folder too
    with pytest.raises(ConfigError, match="force_download=True .* HF_HUB_OFFLINE is set"):
        peftfx.load(load_model("llama"), "someone/adapter", force_download=True)
    with pytest.raises(AdapterNotFoundError, match="subfolder 'nope'"):
        peftfx.load(load_model("llama"), "someone/adapter", subfolder="nope")


def test_offline_set_after_import_is_honoured(load_model, tmp_path, offline_hub, monkeypatch):
    """HF_HUB_OFFLINE=1 set after huggingface_hub was imported (a conftest, a notebook cell): huggingface_hub
    would go online and retry for 23 s; peftfx reads the variable at call time and stays in the cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    ref = peft_adapter(load_model, tmp_path / "a1", 1, r=4, target_modules=["q_proj"])
    cache_repo(offline_hub, "someone/adapter", COMMIT_1, adapter_files(tmp_path / "a1"))
    model = load_model("llama")
    start = time.perf_counter()
    with pytest.raises(AdapterNotFoundError, match="HF_HUB_OFFLINE is set and the hub cache .* does not hold it"):
        peftfx.load(model, "someone/not-cached-adapter")
    assert time.perf_counter() - start < 5
    pm = peftfx.load(model, "someone/adapter")
    kw = batch()
    torch.testing.assert_close(logits(pm, kw), logits(ref, kw), atol=1e-5, rtol=1e-5)


def uploaded(monkeypatch):
    """Intercept HfApi's create_repo / create_branch / upload_folder; returns the record of the calls
    with a copy of every uploaded file (the folder is temporary)."""
    record: dict = {"calls": [], "files": {}}

    def create_repo(self, repo_id, **kw):
        record["calls"].append(("create_repo", repo_id, kw))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kw):
        record["calls"].append(("create_branch", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        record["calls"].append(("upload_folder", repo_id, kw))
        copy = record["dir"] = os.path.join(record["root"], f"uploaded-{len(record['calls'])}")
        shutil.copytree(folder_path, copy, symlinks=True)
        for root, _, names in os.walk(copy):
            for n in names:
                path = os.path.join(root, n)
                assert not os.path.islink(path), path
                record["files"][os.path.relpath(path, copy)] = path
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return record


def test_push_to_hub_uploads_the_adapter_as_peft_does(load_model, model_dirs, tmp_path, offline_hub, monkeypatch):
    record = uploaded(monkeypatch)
    record["root"] = str(tmp_path)
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("other", peftfx.LoraConfig(r=2, target_modules=["o_proj"]))
    with torch.no_grad():
        for p in pm.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(str(tmp_path / "local"))  # a live save folder (with its .peftfx store) elsewhere

    result = pm.push_to_hub("someone/pushed", private=True, token="hf_x", commit_message="first", revision="dev",
                            selected_adapters=["default", "other"])
    assert result == "commit-info"
    names = [c[0] for c in record["calls"]]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert record["calls"][0][2]["private"] is True and record["calls"][0][2]["token"] == "hf_x"
    assert record["calls"][2][2]["commit_message"] == "first" and record["calls"][2][2]["revision"] == "dev"
    assert sorted(record["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "other/adapter_config.json", "other/adapter_model.safetensors"]
    card = ModelCard.load(record["files"]["README.md"])
    assert card.data.base_model == model_dirs["llama"]
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"peftfx", "lora", "transformers", f"base_model:adapter:{model_dirs['llama']}"} <= set(card.data.tags)
    config = json.load(open(record["files"]["adapter_config.json"]))
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == model_dirs["llama"]

    # what was uploaded, served from the hub cache: HF PEFT loads it with peftfx's logits
    cache_repo(offline_hub, "someone/pushed", COMMIT_1, {k: v for k, v in record["files"].items()})
    ref = peft.PeftModel.from_pretrained(load_model("llama"), "someone/pushed").eval()
    ref.load_adapter(record["dir"], "other", subfolder="other")  # PEFT's offline subfolder lookup fails
    kw = batch()
    for name in ("default", "other"):
        pm.set_adapter(name), ref.set_adapter(name)
        torch.testing.assert_close(logits(pm, kw), logits(ref, kw), atol=1e-5, rtol=1e-5)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained("someone/pushed").eval()  # task_type was filled in
    pm.set_adapter("default")
    torch.testing.assert_close(logits(pm, kw), logits(theirs, kw), atol=1e-5, rtol=1e-5)

    record["files"].clear()
    pm.push_to_hub("someone/pushed")  # by default every adapter, as save_pretrained
    assert len(record["files"]) == 5 and not any(".peftfx" in f for f in record["files"])
    with pytest.raises(ConfigError, match="unknown keyword argument"):
        pm.push_to_hub("someone/pushed", privte=True)


def test_auto_peft_model_matches_peft(load_model, model_dirs, tmp_path, offline_hub):
    kw = batch()
    # a PEFT adapter with a task type; the base was saved by save_pretrained (conftest) and is named by path
    ref = peft_adapter(load_model, tmp_path / "causal", 1, r=4, target_modules=["q_proj", "v_proj"],
                       task_type="CAUSAL_LM")
    assert json.load(open(tmp_path / "causal" / "adapter_config.json"))["base_model_name_or_path"] == model_dirs["llama"]
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "causal")).eval()
    ours = peftfx.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "causal"))
    assert isinstance(ours, peftfx.PeftFxModel) and type(ours.get_base_model()) is transformers.LlamaForCausalLM
    assert ours.get_nb_trainable_parameters()[0] == 0
    torch.testing.assert_close(logits(ours, kw), logits(theirs, kw), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(ours, kw), logits(ref, kw), atol=1e-5, rtol=1e-5)
    # the generic class takes the task type; model kwargs go to transformers, peftfx's to peftfx.load;
    # hub arguments to both; from the hub cache by repo id
    cache_repo(offline_hub, "someone/causal", COMMIT_1, adapter_files(tmp_path / "causal"))
    ours = peftfx.AutoPeftModel.from_pretrained("someone/causal", adapter_name="x", is_trainable=True,
                                                dtype=torch.float64, local_files_only=True)
    assert type(ours.get_base_model()) is transformers.LlamaForCausalLM
    assert ours.active_adapters == ["x"] and ours.get_nb_trainable_parameters()[0] > 0
    assert ours.get_base_model().dtype == torch.float64
    torch.testing.assert_close(logits(ours, kw).float(), logits(theirs, kw), atol=1e-4, rtol=1e-4)

    # an adapter with no task type: the class-specific variant decides; the generic one cannot
    peft_adapter(load_model, tmp_path / "untyped", 2, r=4, target_modules=["q_proj"])
    config_path = tmp_path / "untyped" / "adapter_config.json"
    data = json.load(open(config_path))
    data.pop("auto_mapping")
    config_path.write_text(json.dumps(data))
    ours = peftfx.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "untyped"))
    theirs = peft.PeftModel.from_pretrained(load_model("llama"), str(tmp_path / "untyped")).eval()
    torch.testing.assert_close(logits(ours, kw), logits(theirs, kw), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="has no task_type"):
        peftfx.AutoPeftModel.from_pretrained(str(tmp_path / "untyped"))
    with pytest.raises(ConfigError, match="use AutoPeftModelForCausalLM"):
        peftfx.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "causal"))


def test_saving_fills_task_type_where_it_changes_nothing(load_model, tmp_path):
    kw = batch()
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "llama"))
    assert json.load(open(tmp_path / "llama" / "adapter_config.json"))["task_type"] == "CAUSAL_LM"
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "llama")).eval()
    torch.testing.assert_close(logits(pm, kw), logits(theirs, kw), atol=1e-5, rtol=1e-5)

    # a classifier: SEQ_CLS would add the head to modules_to_save, so only a config that saves it gets it
    plain = peftfx.apply(load_model("bert"), peftfx.LoraConfig(r=4, target_modules=["query"]))
    plain.save_pretrained(str(tmp_path / "plain"))
    assert json.load(open(tmp_path / "plain" / "adapter_config.json"))["task_type"] is None
    head = peftfx.apply(load_model("bert"), peftfx.LoraConfig(r=4, target_modules=["query"],
                                                              modules_to_save=["classifier"], init_lora_weights=False))
    head.save_pretrained(str(tmp_path / "head"))
    assert json.load(open(tmp_path / "head" / "adapter_config.json"))["task_type"] == "SEQ_CLS"
    theirs = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "head")).eval()
    torch.testing.assert_close(logits(head, kw), logits(theirs, kw), atol=1e-5, rtol=1e-5)
