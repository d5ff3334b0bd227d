"""Capture by layer (peftfx/layer_capture.py): the model is exported with its layers opaque, one layer per
structure is exported on its own, and the spliced graph must equal PEFT's model exactly, in eval and in
training, for every call size the capture accepts."""
from __future__ import annotations

import peft
import pytest
import torch
import transformers

import peftfx
from conftest import batch
from peftfx import capture

LORA = dict(r=4, lora_alpha=8, init_lora_weights=False)


@pytest.fixture(autouse=True)
def by_layer_from_two_layers(monkeypatch):
    """The test models are shallow; capture them by layer all the same (peftfx.capture.LAYERED_MIN_LAYERS)."""
    monkeypatch.setattr(capture, "LAYERED_MIN_LAYERS", 2)


def _twins(base, targets, seed=0, **apply_options):
    """(PEFT model, peftfx model) over copies of `base` with the same random LoRA weights."""
    ref = peft.get_peft_model(_copy(base), peft.LoraConfig(target_modules=targets, **LORA))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm = peftfx.apply(_copy(base), peftfx.LoraConfig(target_modules=targets, **LORA), **apply_options)
    peftfx.set_peft_model_state_dict(pm, peft.get_peft_model_state_dict(ref))
    return ref, pm


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _layered(pm):
    return [c.layer_graphs for c in pm.state.captures()]


def _check_logits(ref, pm, calls):
    ref.eval(), pm.eval()
    with torch.no_grad():
        for kw in calls:
            torch.testing.assert_close(pm(**kw).logits, ref(**kw).logits, atol=1e-5, rtol=1e-5)


def _check_training(ref, pm, kw):
    ref.train(), pm.train()
    losses = []
    for model in (ref, pm):
        model.zero_grad(set_to_none=True)
        loss = model(**kw, labels=kw["input_ids"]).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    want, got = _grads(ref), _grads(pm)
    assert set(got) == set(want) and got
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], atol=1e-5, rtol=1e-4)


def _grads(model):
    return {
        n.removeprefix("base_model.model.").removeprefix("adapters.").replace(".default", ""): p.grad
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def _llama(layers):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=layers, vocab_size=128, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("layers", [2, 5])
def test_one_layer_graph_serves_every_layer(layers):
    """Whatever the depth, one layer is exported; every call size the capture accepts, padded rows and
    training included, gives PEFT's numbers."""
    torch.manual_seed(0)
    ref, pm = _twins(_llama(layers), ["q_proj", "v_proj", "down_proj"])
    _check_logits(ref, pm, [batch(2, 7), batch(3, 12, seed=2), batch(1, 5, seed=3)])
    assert _layered(pm) == [1]  # one capture (eval) served all three sizes, with one layer graph
    # the layer's made-up example inputs (a layer's activations in size) are not kept
    assert all(p.example_inputs is None for p in pm.state.captures()[0].layer_programs)
    _check_training(ref, pm, batch(2, 9, seed=4))
    assert _layered(pm) == [1, 1]


def test_layers_that_bake_different_constants_get_their_own_graph():
    """Gemma2 alternates sliding-window and full-attention layers of one class and one set of shapes: the
    window is an attribute the graph bakes in, so each kind is its own layer graph. A sequence longer
    than the window tells the two apart."""
    config = transformers.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_hidden_layers=4, vocab_size=128, sliding_window=4, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    ref, pm = _twins(transformers.Gemma2ForCausalLM(config), ["q_proj", "o_proj"])
    _check_logits(ref, pm, [batch(2, 11), batch(2, 6, seed=2)])
    assert _layered(pm) == [2]


@pytest.mark.slow
def test_gpt2_and_bert_layers_are_captured_one_each(load_model):
    """GPT-2 (Conv1D as addmm, a tuple from each block) and BERT (an encoder, bounded sequence length)."""
    for arch, targets in (("gpt2", ["c_attn"]), ("bert", ["query", "value"])):
        ref, pm = _twins(load_model(arch), targets)
        _check_logits(ref, pm, [batch(2, 7), batch(3, 10, seed=2)])
        assert _layered(pm) == [1], arch


@pytest.mark.slow
def test_encoder_decoder_layers_are_captured_per_stack():
    """T5: encoder blocks and decoder blocks are two layer lists (the first block of each stack owns the
    relative position bias, so it is a structure of its own)."""
    config = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    kw = batch(2, 7)
    kw["decoder_input_ids"] = batch(2, 5, seed=5)["input_ids"]
    ref, pm = _twins(transformers.T5ForConditionalGeneration(config), ["q", "v"], example_inputs=kw)
    _check_logits(ref, pm, [kw])
    assert _layered(pm)[0] >= 2


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, settings):
        return x + settings["scale"] * torch.relu(self.proj(x))


class _Net(torch.nn.Module):
    """Its layers take a dict holding a tensor and a module, which the layer op cannot take."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Block() for _ in range(3))
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, {"scale": self.scale, "owner": self})
        return x


def test_a_model_whose_layers_cannot_be_captured_alone_is_exported_whole():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(3, 8)
    want = net(x)
    pm = peftfx.apply(_copy(net), peftfx.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=True),
                      example_inputs={"x": x})
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x=x), want)
    assert _layered(pm) == [0]


def test_capturing_by_layer_leaves_the_random_state_alone():
    """The first train call captures; with LoRA dropout, a seeded first call draws the same dropout masks
    as a seeded later one only if the capture drew nothing from the global generator."""
    torch.manual_seed(0)
    pm = peftfx.apply(_llama(4), peftfx.LoraConfig(target_modules=["q_proj", "v_proj"], lora_dropout=0.3, **LORA))
    pm.train()
    kw = batch(2, 9)
    losses = []
    for _ in range(2):
        torch.manual_seed(11)
        losses.append(pm(**kw, labels=kw["input_ids"]).loss)
    assert _layered(pm) == [1, 1]  # the first train call captured by layer, the second reused it
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    torch.manual_seed(12)
    assert not torch.equal(pm(**kw, labels=kw["input_ids"]).loss, losses[0])  # dropout does draw


def test_prefix_tuning_finds_the_mask_in_layer_graphs(tmp_path):
    """Eager attention: the prefix pass widens the mask it finds by comparing the mask's key dim with the
    scores', across the spliced layer graph and the top graph (their sizes are in one set of symbols)."""
    torch.manual_seed(0)
    base = _llama(4)
    base.config._attn_implementation = "eager"
    ref = peft.get_peft_model(_copy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    ref.eval().save_pretrained(str(tmp_path))
    pm = peftfx.load(_copy(base), str(tmp_path))
    _check_logits(ref, pm, [batch(2, 7), batch(3, 5, seed=2)])
    assert _layered(pm)[0] == 1
