"""passes/ia3.py alone on a tiny exported model: rule `linear` (bound adapters' vectors multiplied) and
rule `mixed` (one adapter per row), against PEFT's IA3 by hand: feed-forward sites y = W(x·l) + b, other
sites y = (Wx + b)·l."""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx.passes import ia3
from peftfx.rewrite import LINEAR_OPS, made_by
from peftfx.select import module_path
from peftfx.state.variants import VariantSpec

from .helpers import aten, block, made, run, variant_setup

SITES = ["q", "k", "conv", "out"]
FEEDFORWARD = ["out", "conv"]  # conv: Conv1D's addmm takes its input as argument 1
B_SITES = ["q", "out"]


@pytest.fixture(scope="module")
def setup():
    net, x = block()
    pm = peftfx.apply(net, peftfx.IA3Config(target_modules=SITES, feedforward_modules=FEEDFORWARD),
                      adapter_name="a", example_inputs=(x,))
    pm.add_adapter("b", peftfx.IA3Config(target_modules=B_SITES, feedforward_modules=["out"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pm.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    pm.eval()
    pm(x)
    return pm, net, x, pm.state.captures()[0]


def _reference(pm, net, x, adapters_of_row):
    store = pm.adapters

    def row(i):
        def call(name, h):
            vectors = [store.site_tensor(a, name, "l").flatten() for a in adapters_of_row(i) if name in store.sites[a]]
            if not vectors:
                return getattr(net, name)(h)
            scale = torch.stack(vectors).prod(0)
            if name in FEEDFORWARD:
                return getattr(net, name)(h * scale)
            return getattr(net, name)(h) * scale
        return net.compute(x[i:i + 1], call)
    with torch.no_grad():
        return torch.cat([row(i) for i in range(x.shape[0])])


def test_linear_scales_inputs_of_feedforward_sites_and_outputs_of_others(setup):
    pm, net, x, capture = setup
    spec = VariantSpec(lora=(pm.adapters.layout("a"), pm.adapters.layout("b")))
    gm, ctx = variant_setup(pm, capture, spec, bind=("a", "b"))
    assert run(gm, ctx, ia3.PASS) == [len(SITES)]
    counts = made(gm, "ia3.linear")
    vectors = len(SITES) + len(B_SITES)
    assert counts["get_attr"] == counts[aten.reshape.default] == vectors  # each vector, flattened
    assert counts[aten.mul.Tensor] == vectors  # q and out: a's vector times b's, then the scale; others: the scale
    assert not made(gm, "ia3.mixed")
    for node in gm.graph.nodes:  # feed-forward sites' linear ops read a scaled input, the others' users a scaled output
        if node.op == "call_function" and node.target in LINEAR_OPS and module_path(node) in SITES:
            scaled_input = any(made_by(a, "ia3.linear") for a in node.args if isinstance(a, torch.fx.Node))
            scaled_output = all(made_by(u, "ia3.linear") for u in node.users)
            assert (scaled_input, scaled_output) == ((True, False) if module_path(node) in FEEDFORWARD
                                                     else (False, True)), module_path(node)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _reference(pm, net, x, lambda i: ["a", "b"]), atol=1e-6, rtol=1e-5)


def test_mixed_gathers_each_rows_vector(setup):
    pm, net, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec(mixed=("a", "b")))
    assert run(gm, ctx, ia3.PASS) == [len(SITES)]
    counts = made(gm, "ia3.mixed")
    assert counts[aten.index_select.default] == len(SITES) and counts[aten.stack.default] == len(SITES)
    assert not made(gm, "ia3.linear")
    rows = torch.tensor([2, 1, 0])  # none, b, a
    names = {0: ["a"], 1: ["b"], 2: []}
    with torch.no_grad():
        torch.testing.assert_close(gm(x, peftfx_row_adapter=rows),
                                   _reference(pm, net, x, lambda i: names[int(rows[i])]), atol=1e-6, rtol=1e-5)


def test_applies_only_to_variants_running_ia3_adapters(setup):
    pm, _, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec())
    before = str(gm.graph)
    assert run(gm, ctx, ia3.PASS) == [0] and str(gm.graph) == before
