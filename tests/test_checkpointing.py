"""Blocks and activation checkpointing: each layer runs as a block through the user's own layer module,
so transformers' checkpointing switches (and module hooks) work, with PEFT + checkpointing as the
reference for gradients and saved-activation bytes."""
from __future__ import annotations

import peft
import pytest
import torch

import peftfx
from conftest import batch
from peftfx.errors import ConfigError
from peftfx.tools.bench.activations import saved_activation_bytes

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def _twins(load_model):
    """(PEFT model, peftfx model) with the same LoRA weights, in train mode (no dropout)."""
    ref = peft.get_peft_model(load_model("llama"), peft.LoraConfig(**LORA))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(**LORA))
    peftfx.set_peft_model_state_dict(pm, peft.get_peft_model_state_dict(ref))
    return ref.train(), pm.train()


def _step(model, kw):
    """(loss, {lora name: grad}, saved-activation bytes) of one forward and backward."""
    for p in model.parameters():
        p.grad = None
    losses = []

    def forward():
        losses.append(model(labels=kw["input_ids"], **kw).loss)
        return losses[-1]

    saved = saved_activation_bytes(forward)
    grads = {n.removeprefix("base_model.model.").removeprefix("adapters.").replace(".default", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.grad is not None}
    return losses[0].detach(), grads, saved


def _lora_grads(grads):
    return {k: v for k, v in grads.items() if "lora_" in k}


def test_each_layer_runs_through_its_own_module(load_model):
    """The embedding and every decoder layer are blocks; a hook on the user's layer fires on each call,
    and the output is PEFT's."""
    ref, pm = _twins(load_model)
    ref.eval(), pm.eval()
    kw = batch(2, 9)
    seen = []
    layer = pm.get_base_model().model.layers[1]
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        out = pm(**kw).logits
        expected = ref(**kw).logits
    handle.remove()
    assert torch.allclose(out, expected, atol=1e-5)
    assert seen == [torch.Size([2, 9, 64])]
    blocks = pm.block_calls()
    assert list(blocks) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2"]
    assert all(len(b.graph_module.graph.nodes) > 1 for b in blocks.values())


@pytest.mark.parametrize(("when", "reentrant"), [
    ("before", True), ("after", False),
    pytest.param("before", False, marks=pytest.mark.slow), pytest.param("after", True, marks=pytest.mark.slow),
])
def test_gradient_checkpointing_saves_what_peft_saves_with_the_same_gradients(load_model, when, reentrant):
    kw = batch(2, 24)
    ref, pm = _twins(load_model)
    loss0, grads0, saved0 = _step(pm, kw)
    ref_loss0, ref_grads0, ref_saved0 = _step(ref, kw)
    gc = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    ref.get_base_model().gradient_checkpointing_enable(**gc)
    if when == "before":  # on the model, then apply (PEFT's order)
        base = load_model("llama")
        base.gradient_checkpointing_enable(**gc)
        state = peftfx.get_peft_model_state_dict(pm)
        pm = peftfx.apply(base, peftfx.LoraConfig(**LORA))
        peftfx.set_peft_model_state_dict(pm, state)
        pm.train()
    else:
        pm.gradient_checkpointing_enable(**gc)
    loss, grads, saved = _step(pm, kw)
    ref_loss, ref_grads, ref_saved = _step(ref, kw)
    assert torch.allclose(loss, loss0) and torch.allclose(loss, ref_loss, atol=1e-5)
    lora = _lora_grads(grads)
    assert lora and lora.keys() == _lora_grads(grads0).keys() == _lora_grads(ref_grads).keys()
    for name, grad in lora.items():
        assert torch.allclose(grad, grads0[name], atol=1e-5), name
        assert torch.allclose(grad, ref_grads[name], atol=1e-5), name
    # checkpointing takes most of the saved activations away, as it does in PEFT, and not less well
    # (the tiny model's logits, loss and head keep about half of it either way)
    assert saved < 0.6 * saved0 and ref_saved < 0.6 * ref_saved0
    assert saved <= 1.1 * ref_saved, (saved, ref_saved)


def test_transformers_every_n_layers_and_switching_off(load_model):
    """transformers' per-layer switches are read at call time: every_n_layers checkpoints layers 0 and 2,
    and switching checkpointing off restores the full activations, without a new capture."""
    kw = batch(2, 24)
    _, pm = _twins(load_model)
    _, grads0, saved0 = _step(pm, kw)
    captures = len(pm.state.captures())
    pm.activation_checkpointing_enable(every_n_layers=2)
    _, grads_half, saved_half = _step(pm, kw)
    pm.activation_checkpointing_enable()
    _, _, saved_all = _step(pm, kw)
    pm.activation_checkpointing_disable()
    _, _, saved_off = _step(pm, kw)
    # off again: all saved (a little more than at first: transformers' enable_input_require_grads hook
    # stays on the embeddings, so the embedding output now takes part in autograd)
    assert saved_all < saved_half < saved0 <= saved_off < 1.05 * saved0
    assert len(pm.state.captures()) == captures
    for name, grad in _lora_grads(grads_half).items():
        assert torch.allclose(grad, grads0[name], atol=1e-5), name


def test_peftfx_policies_keep_gradients_and_order_memory(load_model):
    kw = batch(2, 24)
    _, pm = _twins(load_model)
    pm.get_base_model().enable_input_require_grads()  # what checkpointing switches on, so the counts compare
    _, grads0, saved0 = _step(pm, kw)
    saved = {}
    for policy, options in [("full", {}), ("selective", {}), ("every", {"every": 2}), ("budget", {"memory_budget": 0.7})]:
        pm.checkpointing(policy, **options)
        _, grads, saved[policy] = _step(pm, kw)
        for name, grad in _lora_grads(grads).items():
            assert torch.allclose(grad, grads0[name], atol=1e-5), (policy, name)
    pm.checkpointing("off")
    pm.activation_checkpointing_enable()  # "off" wins over transformers' switches
    assert _step(pm, kw)[2] == pytest.approx(saved0, rel=0.01)
    pm.checkpointing(None)  # back to transformers' switches: checkpointed
    assert _step(pm, kw)[2] == pytest.approx(saved["full"], rel=0.01)
    # every=2 recomputes layers 0 and 2 of 3; memory_budget=0.7 recomputes 1 of 3
    assert saved["full"] < saved["every"] < saved["budget"] < saved0
    assert saved["full"] < saved["selective"] < saved0


def test_bad_policies_are_refused_and_change_nothing(load_model):
    _, pm = _twins(load_model)
    pm.checkpointing("every", every=2)
    for args, kwargs, words in [
        (("sometimes",), {}, "not known"),
        (("every",), {"every": 0}, "positive int"),
        (("full",), {"memory_budget": 0.5}, "goes with policy='budget'"),
        (("budget",), {}, "needs memory_budget"),
        (("selective",), {"use_reentrant": True}, "non-reentrant"),
    ]:
        with pytest.raises(ConfigError, match=words):
            pm.checkpointing(*args, **kwargs)
    assert pm.checkpointing_policy() == {"policy": "every", "every": 2, "memory_budget": None, "use_reentrant": False}


def test_input_require_grads_hook_runs_and_no_grad_checkpoints_nothing(load_model):
    """transformers' enable_input_require_grads (a forward hook on the input embeddings) makes the embedding
    output require grad, as with PEFT: reentrant checkpointing then reaches the first layer's adapters."""
    _, pm = _twins(load_model)
    pm.get_base_model().enable_input_require_grads()
    outputs = []
    handle = pm.get_base_model().model.embed_tokens.register_forward_hook(lambda m, a, o: outputs.append(o))
    pm(**batch(2, 5))
    handle.remove()
    assert outputs[0].requires_grad
    with torch.no_grad():
        pm.activation_checkpointing_enable()
        assert pm(**batch(2, 5)).logits.grad_fn is None


def test_prepare_model_for_kbit_training_matches_peft(model_dirs):
    """PEFT's QLoRA preparation, one import changed: the same frozen and upcast parameters (a bf16 model:
    norms and embeddings become fp32, packed weights stay), checkpointing on; and after apply (fp32 model)
    the same loss and adapter gradients as PEFT's prepared model, under reentrant checkpointing."""
    import transformers

    from conftest import CONFIGS, bnb_dequantize_path

    def quantized(dtype):
        bits = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32)
        model = CONFIGS["llama"][0].from_pretrained(model_dirs["llama"], quantization_config=bits,
                                                    device_map="cpu", dtype=dtype)
        return bnb_dequantize_path(model)

    ref_base, base = quantized(torch.bfloat16), quantized(torch.bfloat16)
    peft.prepare_model_for_kbit_training(ref_base)
    assert peftfx.prepare_model_for_kbit_training(base) is base
    assert {n: (p.dtype, p.requires_grad) for n, p in base.named_parameters()} == {
        n: (p.dtype, p.requires_grad) for n, p in ref_base.named_parameters()}
    assert {p.dtype for p in base.parameters()} == {torch.float32, torch.uint8}  # norms, embeddings; packed
    assert base.is_gradient_checkpointing
    ref_base, base = quantized(torch.float32), quantized(torch.float32)
    peft.prepare_model_for_kbit_training(ref_base, gradient_checkpointing_kwargs={"use_reentrant": True})
    peftfx.prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": True})
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ref = peft.get_peft_model(ref_base, peft.LoraConfig(**lora)).train()
    pm = peftfx.apply(base, peftfx.LoraConfig(**lora)).train()
    peftfx.set_peft_model_state_dict(pm, peft.get_peft_model_state_dict(ref))
    kw = batch(2, 12)
    loss, grads, _ = _step(pm, kw)
    ref_loss, ref_grads, _ = _step(ref, kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert _lora_grads(grads).keys() == _lora_grads(ref_grads).keys()
    for name, grad in _lora_grads(grads).items():  # every layer's adapters, the first one's included
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)
