"""Plain Python semantics of a PeftFxModel (issue 17): copies are independent, pickle and torch.save
round-trip, autocast and grad mode pick the right graph, base-model changes are captured again or refused,
and base-model methods that would do the wrong thing through the fall-through are implemented or refused."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import peft
import pytest
import torch
import transformers
from conftest import VOCAB, batch, perturb_trainable

import peftfx
from peftfx.model import REFUSED


def lora(**kw) -> peftfx.LoraConfig:
    return peftfx.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kw)


@pytest.fixture
def pm(load_model):
    model = peftfx.apply(load_model("llama"), lora())
    perturb_trainable(model)
    return model


def logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


def test_deepcopy_is_independent(pm):
    kw = batch()
    before = logits(pm, kw)
    twin = copy.deepcopy(pm)
    assert type(twin) is type(pm)
    own = {id(p) for p in pm.parameters()}
    assert not any(id(p) in own for p in twin.parameters())
    torch.testing.assert_close(logits(twin, kw), before)  # same numbers from its own tensors
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(0.5)
    assert not torch.allclose(logits(twin, kw), before)
    torch.testing.assert_close(logits(pm, kw), before)  # the original is untouched
    twin.set_adapter("default")
    twin.add_adapter("other", lora())
    assert pm.peft_config.keys() == {"default"}
    # the copy's graphs read the copy's tensors: training the copy moves only its adapters
    twin.train()
    twin(**kw, labels=kw["input_ids"]).loss.backward()
    assert all(p.grad is None for p in pm.parameters())


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_and_torch_save_round_trip(pm, how):
    kw = batch()
    before = logits(pm, kw)
    if how == "pickle":
        back = pickle.loads(pickle.dumps(pm))
    else:
        buffer = io.BytesIO()
        torch.save(pm, buffer)
        buffer.seek(0)
        back = torch.load(buffer, weights_only=False)
    assert isinstance(back, peftfx.PeftFxModel) and back.active_adapters == ["default"]
    torch.testing.assert_close(logits(back, kw), before)
    back.set_adapter("default")


def test_autocast_and_grad_mode_toggling_pick_the_right_graph(load_model, tmp_path):
    pm = peftfx.apply(load_model("llama"), lora())
    perturb_trainable(pm)
    pm.save_pretrained(str(tmp_path))
    ref = peft.PeftModel.from_pretrained(load_model("llama"), str(tmp_path), is_trainable=True)
    pm.train(), ref.train()  # lora_dropout is 0: train mode without randomness
    kw = batch()
    kw["labels"] = kw["input_ids"]
    for autocast in (False, True, False, True):
        for grad in (True, False):
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                mine, theirs = pm(**kw), ref(**kw)
            assert mine.logits.dtype == theirs.logits.dtype
            torch.testing.assert_close(mine.loss, theirs.loss, atol=1e-5, rtol=1e-5)
            assert mine.loss.requires_grad == grad
    assert len({c.signature.autocast for c in pm.state.captures()}) == 2


def test_dtype_change_captures_again(pm):
    kw = batch()
    pm.to(torch.bfloat16)
    out = logits(pm, kw)
    assert out.dtype == torch.bfloat16
    pm.to(torch.float32)
    assert logits(pm, kw).dtype == torch.float32


@pytest.mark.slow
def test_resize_token_embeddings_captures_again(pm):
    kw = batch()
    assert logits(pm, kw).shape[-1] == VOCAB
    pm.resize_token_embeddings(VOCAB + 8)
    out = logits(pm, kw)
    assert out.shape[-1] == VOCAB + 8
    # and the same when the user resizes the model underneath (no stale graph)
    pm.get_base_model().resize_token_embeddings(VOCAB + 16)
    assert logits(pm, kw).shape[-1] == VOCAB + 16
    base = pm.get_base_model()
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, kw), logits(base, kw))


def test_resize_is_refused_when_an_adapter_sits_on_the_head(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    kw = batch()
    before = logits(pm, kw)
    with pytest.raises(peftfx.ConfigError, match="resize the base model before peftfx.apply"):
        pm.resize_token_embeddings(VOCAB + 8)
    assert pm.get_base_model().get_input_embeddings().weight.shape[0] == VOCAB  # nothing changed
    torch.testing.assert_close(logits(pm, kw), before)
    pm.get_base_model().resize_token_embeddings(VOCAB + 8)  # underneath: refused at the next call
    with pytest.raises(peftfx.ConfigError, match="lm_head"):
        pm(**kw)


def test_forward_signature_is_the_wrapped_models(load_model):
    pm = peftfx.apply(load_model("llama"), lora())
    assert transformers.utils.find_labels(type(pm)) == ["labels"]
    assert inspect.signature(pm.forward).parameters.keys() == inspect.signature(pm.get_base_model().forward).parameters.keys()
    qa = transformers.BertForQuestionAnswering(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48))
    pq = peftfx.apply(qa, peftfx.LoraConfig(r=2, target_modules=["query"]))
    assert transformers.utils.find_labels(type(pq)) == ["start_positions", "end_positions"]


def test_counting_and_footprint_include_the_adapters(load_model):
    pm = peftfx.apply(load_model("llama"), lora())
    ref = peft.get_peft_model(load_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert pm.num_parameters() == ref.num_parameters()
    assert pm.num_parameters(only_trainable=True) == ref.num_parameters(only_trainable=True) > 0
    assert pm.num_parameters(exclude_embeddings=True) == ref.num_parameters(exclude_embeddings=True)
    assert pm.get_memory_footprint(return_buffers=False) == ref.get_memory_footprint(return_buffers=False)
    assert pm.get_memory_footprint() >= ref.get_memory_footprint()  # + peftfx's per-site scale buffers


def test_base_methods_that_would_misbehave_are_refused(pm):
    for name in sorted(REFUSED):
        assert hasattr(pm.get_base_model(), name)  # what the fall-through would have reached
        with pytest.raises(AttributeError, match=name):
            getattr(pm, name)


def test_from_pretrained_is_peft_s(pm, load_model, tmp_path):
    pm.save_pretrained(str(tmp_path))
    back = peftfx.PeftFxModel.from_pretrained(load_model("llama"), str(tmp_path))
    kw = batch()
    torch.testing.assert_close(logits(back, kw), logits(pm, kw))
    assert not any(p.requires_grad for p in back.parameters())  # frozen, as PEFT's from_pretrained


def test_gradient_checkpointing_switch_keeps_gradients(load_model):
    """Switched on before apply (reentrant), then after apply with both use_reentrant values: gradients
    equal those without checkpointing."""
    pm = peftfx.apply(load_model("llama"), lora())
    perturb_trainable(pm)
    pm.train()
    kw = batch()

    def grads():
        pm.zero_grad()
        pm(**kw, labels=kw["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    without = grads()
    before_apply = load_model("llama")
    before_apply.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    twin = peftfx.apply(before_apply, lora())
    twin.load_state_dict(pm.state_dict())
    twin.train()
    twin(**kw, labels=kw["input_ids"]).loss.backward()
    for name, p in twin.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, without[name], atol=1e-5, rtol=1e-5)
    for reentrant in (True, False):
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert pm.get_base_model().is_gradient_checkpointing
        for name, grad in grads().items():
            torch.testing.assert_close(grad, without[name], atol=1e-5, rtol=1e-5)
    pm.gradient_checkpointing_disable()
    assert not pm.get_base_model().is_gradient_checkpointing


def test_peft_entry_point_names(load_model):
    kw = batch()
    pm = peftfx.get_peft_model(load_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert pm.peft_config["default"].r == 4 and pm.num_parameters(only_trainable=True) > 0
    with pytest.raises(peftfx.ConfigError, match="mixed=True"):
        peftfx.get_peft_model(load_model("llama"), lora(), mixed=True)
    assert peftfx.PeftModel is peftfx.PeftFxModel
    torch.testing.assert_close(logits(pm, kw), logits(load_model("llama"), kw))  # B starts at zero


def test_save_pretrained_arguments(pm, tmp_path):
    out = tmp_path / "a"
    pm.save_pretrained(str(out), is_main_process=False)  # Trainer on a non-writing rank
    assert not out.exists()
    pm.save_pretrained(str(out), max_shard_size="5GB", save_embedding_layers="auto")
    assert (out / "adapter_model.safetensors").exists()
    with pytest.raises(peftfx.ConfigError, match="unknown arguments"):
        pm.save_pretrained(str(tmp_path / "b"), shard_everything=True)
    with pytest.raises(peftfx.ConfigError, match="state_dict"):
        pm.save_pretrained(str(tmp_path / "b"), state_dict=pm.state_dict())
    with pytest.raises(peftfx.ConfigError, match="save_embedding_layers"):
        pm.save_pretrained(str(tmp_path / "b"), save_embedding_layers=True)
    assert not (tmp_path / "b").exists()


def test_load_adapter_onto_an_existing_name_loads_in_place(pm, load_model, tmp_path):
    kw = batch()
    pm.save_pretrained(str(tmp_path))
    saved = logits(pm, kw)
    perturb_trainable(pm)
    assert not torch.allclose(logits(pm, kw), saved)
    pm.load_adapter(str(tmp_path), "default", is_trainable=True)  # what Trainer's resume does
    torch.testing.assert_close(logits(pm, kw), saved)
    assert pm.num_parameters(only_trainable=True) > 0
    pm.merge_adapter()
    with pytest.raises(peftfx.ConfigError, match="merged"):
        pm.load_adapter(str(tmp_path), "default")


def test_backbone_call_is_the_adapted_backbone(pm, load_model):
    kw = batch()
    hidden = pm.base_model(**kw).last_hidden_state  # what TRL's fused LM head reads
    head = pm.get_base_model().get_output_embeddings()
    torch.testing.assert_close(head(hidden), logits(pm, kw), atol=1e-5, rtol=1e-5)
    assert pm.base_model.model is pm.get_base_model()  # PEFT's pm.base_model.model
    prompt = peftfx.apply(load_model("llama"), peftfx.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(peftfx.ConfigError, match="prompt-learning"):
        prompt.base_model(**kw)


@pytest.mark.slow
def test_trainer_recognises_models_made_before_it_is_imported():
    import subprocess
    import sys

    code = (
        "import torch, peftfx, sys\n"
        "pm = peftfx.PeftFxModel(torch.nn.Linear(2, 2), example_inputs=(torch.ones(2, 2),))\n"
        "assert 'transformers.trainer' not in sys.modules\n"
        "from transformers import Trainer\n"
        "from transformers.trainer import _is_peft_model\n"
        "from transformers.trainer_utils import _is_peft_model as is_peft\n"
        "assert _is_peft_model(pm) and is_peft(pm) and not is_peft(torch.nn.Linear(2, 2))\n"
        "assert Trainer._save.__peftfx_widened__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=240)


def test_activation_checkpointing_names(pm):
    kw = batch()
    pm.train()
    pm(**kw, labels=kw["input_ids"]).loss.backward()
    pm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert pm.get_base_model().is_activation_checkpointing
    pm(**kw, labels=kw["input_ids"]).loss.backward()  # no "does not require grad" from a traced checkpoint
    pm.activation_checkpointing_disable()
    assert not pm.get_base_model().is_activation_checkpointing
