"""peftfx/bindings.py's eager forward: it reads each get_attr from the owning module's dictionary, resolved
once, and unpacks export's inputs directly. These tests change what a built forward reads between calls
(assigned parameters and buffers, slot-bank rebinds on adapter switches, in-place merges, requantized
buffers of a quantized base) and compare it with the GraphModule's own forward, a fresh build, eager
torch math and HF PEFT."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftfx
from conftest import batch
from oracle import twin_models
from peftfx.bindings import eager_forward
from peftfx.generate import _empty_cache, decode_capture

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.register_buffer("scale", torch.full((5,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


class Nested(nn.Module):
    """Positional, keyword and list inputs; parameters and buffers two modules deep."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Inner(), Inner()])

    def forward(self, x: torch.Tensor, pair: list[torch.Tensor], *, gate: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x + pair[0]) * gate + self.blocks[1](pair[1])


def _reference(gm: torch.fx.GraphModule, x, pair, gate) -> torch.Tensor:
    """The same math in plain torch, reading the GraphModule's tensors now."""
    out = []
    blocks = [gm.get_submodule(f"blocks.{i}") for i in range(2)]  # export's plain modules (no ModuleList)
    for block, h in zip(blocks, (x + pair[0], pair[1])):
        out.append(torch.nn.functional.linear(h, block.lin.weight, block.lin.bias) * block.scale)
    return out[0] * gate + out[1]


def _count_module_getattr(monkeypatch) -> list[int]:
    calls = [0]
    original = nn.Module.__getattr__

    def counting(self, name):
        calls[0] += 1
        return original(self, name)

    monkeypatch.setattr(nn.Module, "__getattr__", counting)
    return calls


def test_eager_forward_follows_reassigned_parameters_and_buffers(monkeypatch):
    torch.manual_seed(0)
    x, pair, gate = torch.randn(3, 6), [torch.randn(3, 6), torch.randn(3, 6)], torch.randn(3, 1)
    program = torch.export.export(Nested(), (x, pair), {"gate": gate}, strict=False)
    gm = program.module(check_guards=False)  # as peftfx's captures (no guard submodule to call)
    run = eager_forward(gm)
    with torch.no_grad():
        calls = _count_module_getattr(monkeypatch)
        first = run(x, pair, gate=gate)
        assert calls[0] == 0  # no chained module reads per call
        monkeypatch.undo()
        torch.testing.assert_close(first, _reference(gm, x, pair, gate), rtol=0, atol=0)
        assert torch.equal(first, gm.forward(x, pair, gate=gate))
        # assigned, not mutated: new parameter and buffer objects after the forward was built
        gm.get_submodule("blocks.0.lin").weight = nn.Parameter(torch.randn(5, 6))
        gm.get_submodule("blocks.1").scale = torch.full((5,), -3.0)
        gm.get_submodule("blocks.1.lin").bias = nn.Parameter(torch.randn(5))
        second = run(x, pair, gate=gate)
        assert not torch.equal(second, first)
        torch.testing.assert_close(second, _reference(gm, x, pair, gate), rtol=0, atol=0)
        assert torch.equal(second, gm.forward(x, pair, gate=gate))


def _named(pm, inputs):
    return pm.state.capturer.prepare_inputs((), inputs)


def test_built_variant_follows_adapter_switches_and_merges(load_model, tmp_path):
    """One LoRA variant serves both adapters (a slot-bank rebind replaces its holders' tensors); a merge
    writes the base weights in place; delete + reload gives new tensors under the same name."""
    ref, pm = twin_models(load_model, "llama", {"default": LORA, "b": LORA}, tmp_path)
    inputs = batch()
    with torch.no_grad():
        for adapter in ("default", "b", "default"):
            pm.set_adapter(adapter)
            ref.set_adapter(adapter)
            torch.testing.assert_close(pm(**inputs).logits, ref(**inputs).logits, atol=1e-5, rtol=1e-5)
        assert len([s for s in pm.variant_specs() if s.lora]) == 1  # both adapters ran through one graph
        base_out = None
        with pm.disable_adapter(), ref.disable_adapter():
            base_out = pm(**inputs).logits  # builds the base variant the merged model runs
            torch.testing.assert_close(base_out, ref(**inputs).logits, atol=1e-5, rtol=1e-5)
        pm.merge_adapter()
        ref.merge_adapter()
        merged = pm(**inputs).logits
        assert not torch.allclose(merged, base_out, atol=1e-4)
        torch.testing.assert_close(merged, ref(**inputs).logits, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
        ref.unmerge_adapter()
        with pm.disable_adapter():
            torch.testing.assert_close(pm(**inputs).logits, base_out, atol=1e-6, rtol=1e-6)
        pm.delete_adapter("b")
        pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
        pm.set_adapter("b")
        ref.set_adapter("b")
        torch.testing.assert_close(pm(**inputs).logits, ref(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_merge_on_a_quantized_base_is_seen_by_the_built_base_variant(load_model):
    """Merging onto a 4-bit base replaces the packed buffers (QuantStore.replace); the base variant built
    before the merge must read the new ones, as a fresh build of the graph does."""
    pytest.importorskip("bitsandbytes")
    pm = peftfx.quantize(load_model("llama"), peftfx.QuantConfig(load_in_4bit=True))
    pm.add_adapter("a", peftfx.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                          init_lora_weights=False))
    pm.eval()
    inputs = batch()
    with torch.no_grad():
        with pm.disable_adapter():
            before = pm(**inputs).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "merging onto a quantized base requantizes"
            pm.merge_adapter()
        merged = pm(**inputs).logits  # the base variant built above, over requantized weights
        assert not torch.allclose(merged, before, atol=1e-4)
        fresh = pm.graph_module  # a fresh build of the running variant
        assert torch.equal(merged, fresh(**_named(pm, inputs)).logits)


def test_decode_variant_unpacks_cache_lists_like_the_graph_module(load_model, tmp_path):
    """The decode graph takes per-layer lists of cache tensors; the direct unpacking feeds the same
    tensors (outputs and the in-place cache writes agree with the GraphModule's pytree path)."""
    _, pm = twin_models(load_model, "llama", {"default": LORA}, tmp_path)
    model = pm.get_base_model()
    capture = decode_capture(pm, "input_ids")
    gm, run = pm.state.variant(capture, None)
    results = []
    for forward in (gm.forward, run):
        keys, values = _empty_cache(model, 2, 12, "cpu")
        mask = torch.zeros(2, 12, dtype=torch.long)
        mask[:, :5] = 1
        with torch.no_grad():
            out = forward(tokens=torch.tensor([[5, 6, 7, 8, 9]] * 2), attention_mask=mask,
                          position_ids=torch.arange(5).expand(2, -1), cache_length=torch.tensor(0),
                          keys=keys, values=values)
        results.append((out, keys, values))
    (want, want_k, want_v), (got, got_k, got_v) = results
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_k + got_v, want_k + want_v))
    assert any(k.abs().sum() > 0 for k in got_k)  # the step wrote the cache
