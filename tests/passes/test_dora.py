"""passes/dora.py alone on a tiny exported model: rule `linear` (bound DoRA adapters, eval and train)
and rule `mixed` (one adapter per row), against PEFT's DoRA formula written out by hand:
y' = b + g·(W x) + g·s·B(A(x)), g = m / ||W + s·B·A|| per output row (the norm detached)."""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx.errors import ConfigError
from peftfx.methods.lora import lora_weights
from peftfx.passes import dora
from peftfx.state.variants import VariantSpec

from .helpers import aten, base_weight, block, made, run, variant_setup

SITES = ["q", "k", "conv"]  # biased linear, bias-less linear, Conv1D
D2_SITES = ["q", "v"]


@pytest.fixture(scope="module")
def setup():
    net, x = block()
    pm = peftfx.apply(net, peftfx.LoraConfig(r=2, lora_alpha=4, use_dora=True, init_lora_weights=False,
                                             target_modules=SITES), adapter_name="d1", example_inputs=(x,))
    pm.add_adapter("d2", peftfx.LoraConfig(r=3, lora_alpha=3, use_dora=True, init_lora_weights=False,
                                           target_modules=D2_SITES))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # magnitudes away from ||W + sBA||, so g != 1
        for adapter in ("d1", "d2"):
            for key in pm.adapters.sites[adapter]:
                m = pm.adapters.site_tensor(adapter, key, "m")
                m.mul_(1 + 0.5 * torch.rand(m.shape, generator=g))
    pm.eval()
    pm(x)
    return pm, net, x, pm.state.captures()[0]


def _dora(pm, net, adapter, name, h, y):
    store = pm.adapters
    slot = store.sites[adapter][name]
    a, b = lora_weights(store, adapter, name)
    m = store.site_tensor(adapter, name, "m")
    w = base_weight(net, name)
    g = m / torch.linalg.norm(w + slot.scaling * (b @ a), dim=1).detach()
    bias = net.get_submodule(name).bias
    without_bias = y - bias if bias is not None else y
    return g * without_bias + (bias if bias is not None else 0) + g * slot.scaling * (h @ a.T @ b.T)


def _reference(pm, net, x, adapters_of_row):
    def row(i):
        def call(name, h):
            y = getattr(net, name)(h)
            for adapter in adapters_of_row(i):
                if name in pm.adapters.sites[adapter]:
                    y = _dora(pm, net, adapter, name, h, y)
            return y
        return net.compute(x[i:i + 1], call)
    return torch.cat([row(i) for i in range(x.shape[0])])


def _bound(pm, capture, adapter, training=False):
    spec = VariantSpec(lora=(pm.adapters.layout(adapter),), training=training)
    return variant_setup(pm, capture, spec, bind=(adapter,))


def test_linear_eval(setup):
    pm, net, x, capture = setup
    gm, ctx = _bound(pm, capture, "d1")
    assert run(gm, ctx, dora.PASS) == [len(SITES)]
    counts = made(gm, "dora.linear")
    assert counts[aten.addcmul.default] == len(SITES)  # g·(y - b) folded: h + y·g
    assert counts[aten.linear.default] == 2 * len(SITES)  # A, then (g·s)B with (1 - g)b
    assert aten.sqrt.default not in counts  # eval: the norm is a constant computed before the run
    assert not made(gm, "dora.mixed")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _reference(pm, net, x, lambda i: ["d1"]), atol=1e-5, rtol=1e-5)


def test_linear_train_recomputes_the_norm_and_trains_the_magnitude(setup):
    pm, net, x, capture = setup
    gm, ctx = _bound(pm, capture, "d1", training=True)
    assert run(gm, ctx, dora.PASS) == [len(SITES)]
    assert made(gm, "dora.linear")[aten.sqrt.default] == len(SITES)
    store = pm.adapters
    leaves = [store.site_tensor("d1", key, which) for key in SITES for which in ("A", "B", "m")]
    got, want = gm(x), _reference(pm, net, x, lambda i: ["d1"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got_grads = torch.autograd.grad(got.square().sum(), leaves, allow_unused=True)
    want_grads = torch.autograd.grad(want.square().sum(), leaves, allow_unused=True)
    for g1, g2 in zip(got_grads, want_grads):
        assert g1 is not None
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_mixed_gathers_each_rows_adapter(setup):
    pm, net, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec(mixed=("d1", "d2")))
    sites = sorted(set(SITES) | set(D2_SITES))
    assert run(gm, ctx, dora.PASS) == [len(sites)]
    counts = made(gm, "dora.mixed")
    assert counts[aten.bmm.default] == 2 * len(sites) and counts[aten.addcmul.default] == len(sites)
    assert not made(gm, "dora.linear")
    rows = torch.tensor([1, 2, 0])  # d2, no adapter, d1
    names = {0: ["d1"], 1: ["d2"], 2: []}
    with torch.no_grad():
        torch.testing.assert_close(gm(x, peftfx_row_adapter=rows),
                                   _reference(pm, net, x, lambda i: names[int(rows[i])]), atol=1e-5, rtol=1e-5)


def test_applies_only_to_variants_running_dora_adapters(setup):
    pm, _, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec())
    before = str(gm.graph)
    assert run(gm, ctx, dora.PASS) == [0] and str(gm.graph) == before


def test_validate_refuses_lora_after_dora_on_shared_layers(setup):
    pm, _, x, capture = setup
    pm.add_adapter("plain", peftfx.LoraConfig(r=2, target_modules=["q"]))
    try:
        spec = VariantSpec(lora=(pm.adapters.layout("d1"), pm.adapters.layout("plain")))
        gm, ctx = variant_setup(pm, capture, spec, bind=("d1", "plain"))
        before = str(gm.graph)
        with pytest.raises(ConfigError, match=r"LoRA adapter 'plain' is active after a DoRA adapter on the same "
                                              r"layers; peftfx applies LoRA adapters before DoRA ones there: put "
                                              r"the LoRA adapters first in set_adapter\(\[\.\.\.\]\)"):
            run(gm, ctx, dora.PASS)
        assert str(gm.graph) == before
        gm, ctx = variant_setup(pm, capture, spec, bind=("plain", "d1"))  # LoRA first: fine
        assert run(gm, ctx, dora.PASS) == [len(SITES)]
    finally:
        pm.delete_adapter("plain")


def test_validate_refuses_a_quantized_base():
    net, x = block()
    pm = peftfx.apply(net, peftfx.LoraConfig(r=2, use_dora=True, target_modules=["q"]), example_inputs=(x,))
    pm.quantize(peftfx.QuantConfig(load_in_4bit=True))
    capture = pm.state.reference_capture()
    gm, ctx = variant_setup(pm, capture, VariantSpec(lora=(pm.adapters.layout("default"),)), bind=("default",))
    before = str(gm.graph)
    with pytest.raises(ConfigError, match=r"DoRA adapters need the full-precision base weights; DoRA on a "
                                          r"quantized base is not supported \(dequantize first\)"):
        run(gm, ctx, dora.PASS)
    assert str(gm.graph) == before
