"""passes/modules_to_save.py alone on a tiny exported model: rule `retarget` points the saved module's
get_attr nodes at the active adapter's copy (the first active adapter saving it wins)."""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx.passes import modules_to_save
from peftfx.rewrite import MOUNT, provenance_of
from peftfx.state.variants import VariantSpec

from .helpers import block, made, made_nodes, run, variant_setup


@pytest.fixture(scope="module")
def setup():
    """Adapters "a" and "b" each keep a trained copy of `head` (different values); "b" also of `out`."""
    net, x = block()
    pm = peftfx.apply(net, peftfx.LoraConfig(r=2, target_modules=["q"], modules_to_save=["head"]),
                      adapter_name="a", example_inputs=(x,))
    pm.add_adapter("b", peftfx.LoraConfig(r=2, target_modules=["q"], modules_to_save=["head", "out"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for adapter, copies in pm.adapters.saved.items():
            for copy in copies.values():
                for p in copy.parameters():
                    p.add_(torch.randn(p.shape, generator=g))
    pm.eval()
    pm(x)
    return pm, net, x, pm.state.captures()[0]


def _reference(net, x, modules):
    """The model with some of its modules swapped for copies, in eager PyTorch."""
    def call(name, h):
        return modules.get(name, getattr(net, name))(h)
    with torch.no_grad():
        return net.compute(x, call)


def _retargeted(gm):
    """get_attr target -> adapter, for the reads rule `retarget` pointed at a copy."""
    return {str(n.target): provenance_of(n).adapter for n in made_nodes(gm, "modules_to_save.retarget")
            if n.op == "get_attr"}


def test_retarget_reads_the_adapters_copy(setup):
    pm, net, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec(saved=("a",)))
    assert run(gm, ctx, modules_to_save.PASS) == [2]  # head.weight, head.bias
    targets = _retargeted(gm)
    assert len(targets) == 2 and set(targets.values()) == {"a"}
    assert all(t.startswith(f"{MOUNT}.") for t in targets)
    assert made(gm, "modules_to_save.retarget") == {"get_attr": 2}  # retargets, inserts nothing
    copies = pm.adapters.saved["a"]
    with torch.no_grad():
        got = gm(x)
    torch.testing.assert_close(got, _reference(net, x, copies), atol=0, rtol=0)
    assert not torch.allclose(got, _reference(net, x, {}))  # the copy really differs from the base head


def test_first_active_adapter_wins(setup):
    pm, net, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec(saved=("b", "a")))
    assert run(gm, ctx, modules_to_save.PASS) == [4]  # b's head (weight, bias) and out (weight, bias)
    assert set(_retargeted(gm).values()) == {"b"}
    gm2, ctx2 = variant_setup(pm, capture, VariantSpec(saved=("a", "b")))
    run(gm2, ctx2, modules_to_save.PASS)
    assert sorted(_retargeted(gm2).values()) == ["a", "a", "b", "b"]  # a's head, b's out
    saved = pm.adapters.saved
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _reference(net, x, saved["b"]), atol=0, rtol=0)
        torch.testing.assert_close(gm2(x), _reference(net, x, {"head": saved["a"]["head"], "out": saved["b"]["out"]}),
                                   atol=0, rtol=0)


def test_applies_only_when_an_active_adapter_saves_modules(setup):
    pm, _, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec(lora=(pm.adapters.layout("a"),)), bind=("a",))
    before = str(gm.graph)
    assert ctx.saved == () and not modules_to_save.PASS.applies(ctx)
    assert run(gm, ctx, modules_to_save.PASS) == [0] and str(gm.graph) == before
