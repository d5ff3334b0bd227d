"""passes/fuse.py: the fused LoRA paths compute what the lora pass's paths compute (outputs and the
gradients of A and B), with the node counts the rules promise."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftfx
from peftfx.methods.lora import lora_weights
from conftest import batch, perturb_trainable
from oracle import twin_models
from peftfx.rewrite import made_by

aten = torch.ops.aten
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def _run(pm, inputs, fusion: bool, train: bool):
    """(output, {param name: grad}) of one forward (and backward of its sum or loss) with fusion on/off."""
    pm.fusion = fusion
    pm.train(train)
    pm.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the model's own dropout (GPT-2) draws the same masks in both graphs
    with torch.set_grad_enabled(train):
        out = pm(**inputs) if isinstance(inputs, dict) else pm(inputs)
    logits = out.logits if hasattr(out, "logits") else out
    if train:
        logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_same(pm, inputs, train: bool) -> None:
    plain, plain_grads = _run(pm, inputs, fusion=False, train=train)
    fused, fused_grads = _run(pm, inputs, fusion=True, train=train)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    if train:
        assert any("lora_A" in n for n in fused_grads) and any("lora_B" in n for n in fused_grads)
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def _counts(gm, passes=("lora", "fuse")) -> Counter:
    """How many adapter nodes of each op the graph runs (nodes the given passes inserted)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function"
                   and any(made_by(n, p) for p in passes))


@pytest.mark.parametrize("name,targets", [("llama", LLAMA_TARGETS), ("gpt2", GPT2_TARGETS)])
def test_fused_matches_peft_and_unfused(load_model, tmp_path, name, targets):
    """Eval logits equal HF PEFT's; eval and train outputs and gradients equal the unfused graph."""
    ref, pm = twin_models(load_model, name, {"default": dict(r=4, lora_alpha=8, target_modules=targets)}, tmp_path)
    for p in pm.parameters():
        p.requires_grad_(False)
    for p in pm.adapters.parameters():
        p.requires_grad_(True)
    inputs = batch()
    with torch.no_grad():
        want = ref(**inputs).logits
    pm.eval()
    torch.testing.assert_close(pm(**inputs).logits, want, atol=1e-5, rtol=1e-5)
    _assert_same(pm, inputs, train=False)
    _assert_same(pm, inputs, train=True)


def test_llama_node_counts(load_model):
    """3 layers × 7 targets: one A matmul per shared input (q/k/v, gate/up) or single site, a B matmul,
    a weight-side scale and an add per site, one dropout per A matmul."""
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=0.1))
    inputs = batch()
    layers, sites, a_matmuls = 3, 21, 12  # per layer: qkv, gate/up shared; o, down alone
    pm.eval()
    pm(**inputs)
    fused = _counts(pm.graph_module)
    assert fused[aten.cat.default] == 2 * layers
    assert fused[aten.linear.default] == a_matmuls + sites
    assert fused[aten.mul.Tensor] == sites  # B * scaling: on the weight (checked below)
    assert fused[aten.add.Tensor] == sites
    assert fused[aten.slice.Tensor] == 5 * layers
    for node in pm.graph_module.graph.nodes:
        if node.target == aten.mul.Tensor and made_by(node, "fuse.fold_scaling"):
            assert all(arg.op == "get_attr" for arg in node.args)  # B and the scale, not an activation
    pm.fusion = False
    pm(**inputs)
    plain = _counts(pm.graph_module)
    assert plain[aten.linear.default] == 2 * sites and plain[aten.add.Tensor] == sites
    assert not _counts(pm.graph_module, passes=("fuse",))
    pm.fusion = True
    pm.train()
    pm(**inputs)
    assert _counts(pm.graph_module)[aten.dropout.default] == a_matmuls
    pm.fusion = False
    pm(**inputs)
    assert _counts(pm.graph_module)[aten.dropout.default] == sites


def test_two_adapters_and_mixed_ranks(load_model):
    """Two active adapters summed at each site, ranks differing by module within one shared group."""
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, rank_pattern={"k_proj": 2, "up_proj": 6}))
    pm.add_adapter("other", peftfx.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb_trainable(pm)
    pm.set_adapter(["default", "other"])
    for p in pm.adapters.parameters():
        p.requires_grad_(True)
    inputs = batch()
    _assert_same(pm, inputs, train=False)
    _assert_same(pm, inputs, train=True)
    pm.eval()
    pm(**inputs)
    # per layer the attention input (5 A's), the MLP input (2) and down_proj's input (2) each feed one matmul
    assert _counts(pm.graph_module)[aten.cat.default] == 3 * 3


class Block(nn.Module):
    """One input read by a biased nn.Linear, a bias-less nn.Linear, an F.linear on a bare weight and a
    GPT-2 Conv1D (addmm with an (in, out) weight); then a single biased projection."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.biased = nn.Linear(d, d, bias=True)
        self.plain = nn.Linear(d, d, bias=False)
        self.bare = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.conv = Conv1D(d, d)
        self.out = nn.Linear(d, d, bias=True)

    def forward(self, x):
        y = self.biased(x) * torch.sigmoid(self.plain(x)) + F.linear(x, self.bare) + self.conv(x)
        return x + self.out(torch.tanh(y))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _eager_reference(net: Net, pm, x: torch.Tensor) -> torch.Tensor:
    """The model with each site's LoRA term written out in eager PyTorch, reading peftfx's tensors."""
    def lora(key, h):
        a, b = lora_weights(pm.adapters, "default", key)
        return (h @ a.T @ b.T) * pm.adapters.sites["default"][key].scaling

    for i, blk in enumerate(net.blocks):
        p = f"blocks.{i}"
        y = ((blk.biased(x) + lora(f"{p}.biased", x)) * torch.sigmoid(blk.plain(x) + lora(f"{p}.plain", x))
             + F.linear(x, blk.bare) + lora(f"{p}.bare", x) + blk.conv(x) + lora(f"{p}.conv", x))
        x = x + blk.out(torch.tanh(y)) + lora(f"{p}.out", torch.tanh(y))
    return x


def test_biased_and_bias_less_targets_mixed():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 5, 16)
    pm = peftfx.apply(net, peftfx.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                              target_modules=["biased", "plain", "bare", "conv", "out"]),
                      example_inputs=(x,))
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), _eager_reference(net, pm, x), atol=1e-5, rtol=1e-5)
    _assert_same(pm, x, train=False)
    _assert_same(pm, x, train=True)
    pm.eval()
    pm(x)
    counts = _counts(pm.graph_module)
    assert counts[aten.cat.default] == 2  # biased, plain and bare share x (conv reads a 2-D view of it)
    assert counts[aten.linear.default] == 2 * (1 + 2 + 5)  # per block: one shared A, two single As, five Bs


def test_shared_dropout_still_drops(load_model):
    """In training the fused group draws one mask: outputs differ from eval and from call to call."""
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=LLAMA_TARGETS,
                                                              lora_dropout=0.5, init_lora_weights=False))
    inputs = batch()
    pm.eval()
    with torch.no_grad():
        eval_out = pm(**inputs).logits
        pm.train()
        first, second = pm(**inputs).logits, pm(**inputs).logits
    assert not torch.allclose(first, eval_out) and not torch.allclose(first, second)


def test_decode_graph_is_fused_only_when_compiled(load_model):
    """generate's decode graph runs one token per row, where eagerly the group's cat and views cost more
    than the matmuls they save: its eager variants are built without passes/fuse.py, its compiled ones
    with it (tests/test_generate.py's slow test checks compiled tokens against PEFT's)."""
    from peftfx.generate import decode_capture
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    pm.generate(batch(b=1, s=4, pad=False)["input_ids"], max_new_tokens=2)
    capture = decode_capture(pm, "input_ids")
    decode_graph = pm.state.variant(capture)[0]
    assert _counts(decode_graph, passes=("lora",)) and not _counts(decode_graph, passes=("fuse",))
    pm.eval()
    pm(**batch())
    assert _counts(pm.graph_module, passes=("fuse",))
    pm.compile()  # drops the variants; building one wraps it in torch.compile but compiles nothing yet
    assert _counts(pm.state.variant(capture)[0], passes=("fuse",))


def test_bf16_model_shares_the_cast_to_the_adapter_dtype(load_model):
    """A bf16 model keeps fp32 adapters, so each A path starts with a cast of x to fp32: a group shares
    one cast (and the matmul), and the output matches the unfused graph to bf16 precision."""
    pm = peftfx.apply(load_model("llama").to(torch.bfloat16),
                      peftfx.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False))
    assert {p.dtype for p in pm.adapters.parameters()} == {torch.float32}
    inputs = batch()
    pm.eval()
    outs, casts = {}, {}
    for fusion in (False, True):
        pm.fusion = fusion
        with torch.no_grad():
            outs[fusion] = pm(**inputs).logits
        casts[fusion] = _counts(pm.graph_module)[aten.to.dtype]
    assert outs[True].dtype == torch.bfloat16
    # bf16 rounding: the two graphs' fp32 adapter sums round to bf16 apart by an ulp now and then
    scale = outs[False].float().abs().max()
    assert (outs[True].float() - outs[False].float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * scale
    layers, sites = 3, 9
    assert casts[False] == 2 * sites  # x to fp32 and the product back to bf16, per site
    assert casts[True] == layers + sites  # one cast of x per group
