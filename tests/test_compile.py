"""torch.compile over variants: adapters of one layout share compiled code, so switching recompiles nothing."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import batch
from peftfx.methods.lora import lora_weights
from oracle import twin_models

ADAPTERS = {
    "default": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=20, target_modules=["q_proj", "v_proj"]),  # same layout, other scaling
    "c": dict(r=2, target_modules=["o_proj"]),  # another layout
}


@pytest.fixture
def compiled(load_model, tmp_path):
    ref, pm = twin_models(load_model, "llama", ADAPTERS, tmp_path)
    counter = CompileCounterWithBackend("aot_eager")
    pm.compile(backend=counter)
    return ref, pm, counter


def _states(pm):
    for name in ("default", "b", "c", None):
        if name is None:
            with pm.disable_adapter():
                yield "disabled"
        else:
            pm.set_adapter(name)
            yield name


def test_switching_same_layout_adapters_compiles_nothing(compiled):
    ref, pm, counter = compiled
    kw = batch(2, 8)
    frames = {}
    with torch.no_grad():
        for state in _states(pm):
            pm(**kw)
            frames[state] = counter.frame_count
    assert frames["b"] == frames["default"] > 0  # b has default's layout: it reuses the compiled code
    assert frames["disabled"] > frames["c"] > frames["b"]  # c's layout and the base graph are new
    first_pass = counter.frame_count
    torch._dynamo.config.error_on_recompile = True
    try:
        with torch.no_grad():
            for _ in range(2):
                for state in _states(pm):
                    got = pm(**kw).logits
                    if state == "disabled":
                        with ref.disable_adapter():
                            want = ref(**kw).logits
                    else:
                        ref.set_adapter(state)
                        want = ref(**kw).logits
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            pm(**batch(3, 11))  # another batch and sequence length: dynamic, no recompile
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counter.frame_count == first_pass


def test_compiled_training_step_matches_eager(compiled):
    _, pm, _ = compiled
    pm.set_adapter("default")
    pm.adapters.set_trainable("default", True)
    kw = batch(2, 8)
    pm.train()
    loss = pm(**kw, labels=kw["input_ids"]).loss
    loss.backward()
    a, _ = lora_weights(pm.adapters, "default", "model.layers.0.self_attn.q_proj")
    compiled_grad = a.grad.clone()
    a.grad = None
    pm.state.set_compile(None)  # eager again
    pm(**kw, labels=kw["input_ids"]).loss.backward()
    torch.testing.assert_close(compiled_grad, a.grad, atol=1e-6, rtol=1e-5)


def _llama(layers):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=layers, vocab_size=128, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _saved_bytes(forward):
    """Bytes of the distinct tensors autograd saves for the backward while `forward` runs (a checkpointed
    region saves through its own hooks, so what it drops is not counted). A TorchDispatchMode count
    would not do here: dynamo runs eagerly under one."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    return out, sum(storages.values())


def _compiled_step(layers, gradient_checkpointing=False):
    """(frames compiled, loss, LoRA grads, saved-activation bytes) of the first compiled train step."""
    import peftfx

    pm = peftfx.apply(_llama(layers), peftfx.LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                        init_lora_weights=False))
    if gradient_checkpointing:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counter = CompileCounterWithBackend("aot_eager")
    pm.compile(backend=counter)
    pm.train()
    kw = batch(2, 8)
    pm(**kw, labels=kw["input_ids"]).loss.backward()  # capture and compile outside the hooks
    pm.zero_grad(set_to_none=True)
    loss, saved = _saved_bytes(lambda: pm(**kw, labels=kw["input_ids"]).loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    return counter.frame_count, loss.detach(), grads, saved


def test_compile_traces_each_block_structure_once_whatever_the_depth():
    """Regional compilation: a 2-layer and a 4-layer model compile the same one frame for an eval call (one
    for all the layers; the embedding block and the top graph run eagerly)."""
    import peftfx

    frames = []
    for layers in (2, 4):
        pm = peftfx.apply(_llama(layers), peftfx.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        counter = CompileCounterWithBackend("aot_eager")
        pm.compile(backend=counter)
        pm.eval()
        kw = batch(2, 8)  # a sequence length equal to head_dim (32 / 4 heads): duck shaping would tie them
        with torch.no_grad():
            got = pm(**kw).logits
            torch._dynamo.config.error_on_recompile = True
            try:
                pm(**batch(3, 11))  # another batch and length: dynamic, no recompile
            finally:
                torch._dynamo.config.error_on_recompile = False
            pm.state.set_compile(None)
            torch.testing.assert_close(got, pm(**kw).logits, atol=1e-6, rtol=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] == 1


@pytest.mark.slow
def test_compiled_blocks_keep_gradient_checkpointing():
    """transformers' gradient checkpointing under pm.compile(): the same loss and gradients, with fewer
    activations kept for the backward."""
    _, loss, grads, saved = _compiled_step(3)
    _, loss_gc, grads_gc, saved_gc = _compiled_step(3, gradient_checkpointing=True)
    torch.testing.assert_close(loss_gc, loss)
    assert set(grads_gc) == set(grads) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gc[name], grad, atol=1e-6, rtol=1e-5)
    assert saved_gc < 0.7 * saved, (saved_gc, saved)
