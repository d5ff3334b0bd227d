"""passes/lora.py alone on a tiny exported model: rule `linear` (bound adapters, summed) and rule `mixed`
(one adapter per row), against y + s·B(A(x)) written out by hand."""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx.methods.lora import lora_weights
from peftfx.passes import lora
from peftfx.state.variants import VariantSpec

from .helpers import Block, aten, block, made, run, variant_setup

SITES = list(Block.SITES)
B_SITES = ["q", "v"]


@pytest.fixture(scope="module")
def setup():
    """A Block with adapter "default" (r=2, all five sites) and "b" (r=3, q and v, dropout 0.1)."""
    net, x = block()
    pm = peftfx.apply(net, peftfx.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=SITES),
                      example_inputs=(x,))
    pm.add_adapter("b", peftfx.LoraConfig(r=3, lora_alpha=6, init_lora_weights=False, target_modules=B_SITES,
                                          lora_dropout=0.1))
    pm.eval()
    pm(x)  # the capture
    return pm, net, x, pm.state.captures()[0]


def _spec(pm, adapters, training=False):
    return VariantSpec(lora=tuple(pm.state.store.layout(a) for a in adapters), training=training)


def _reference(pm, net, x, adapters_of_row):
    """The model with y + s·B(A(x)) at each site, per row for the adapters `adapters_of_row(row)` names."""
    store = pm.adapters

    def row(i):
        def call(name, h):
            y = getattr(net, name)(h)
            for adapter in adapters_of_row(i):
                if name in store.sites[adapter]:
                    a, b = lora_weights(store, adapter, name)
                    y = y + store.sites[adapter][name].scaling * (h @ a.T @ b.T)
            return y
        return net.compute(x[i:i + 1], call)
    with torch.no_grad():
        return torch.cat([row(i) for i in range(x.shape[0])])


def test_linear_adds_one_path_per_bound_adapter_and_site(setup):
    pm, net, x, capture = setup
    gm, ctx = variant_setup(pm, capture, _spec(pm, ["default", "b"]), bind=("default", "b"))
    assert run(gm, ctx, lora.PASS) == [len(SITES)]  # one rewrite per site; head is no site
    paths = len(SITES) + len(B_SITES)
    counts = made(gm, "lora.linear")
    assert counts[aten.linear.default] == 2 * paths  # A then B
    assert counts[aten.mul.Tensor] == paths and counts[aten.add.Tensor] == paths
    assert counts["get_attr"] == 3 * paths  # A, B and scaling from the slot bank
    assert aten.dropout.default not in counts  # eval: no dropout
    assert not made(gm, "lora.mixed")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _reference(pm, net, x, lambda i: ["default", "b"]), atol=1e-6, rtol=1e-5)


def test_linear_adds_dropout_in_training_only_where_p_is_positive(setup):
    pm, net, x, capture = setup
    gm, ctx = variant_setup(pm, capture, _spec(pm, ["default", "b"], training=True), bind=("default", "b"))
    run(gm, ctx, lora.PASS)
    dropouts = [n for n in gm.graph.nodes if n.target is aten.dropout.default and n.op == "call_function"]
    assert len(dropouts) == len(B_SITES) and all(n.args[1:] == (0.1, True) for n in dropouts)
    # with one bound adapter: its paths only, read from slot position 0
    gm, ctx = variant_setup(pm, capture, _spec(pm, ["b"]), bind=("b",))
    assert run(gm, ctx, lora.PASS) == [len(B_SITES)]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _reference(pm, net, x, lambda i: ["b"]), atol=1e-6, rtol=1e-5)


def test_mixed_gathers_each_rows_adapter(setup):
    pm, net, x, capture = setup
    spec = VariantSpec(mixed=("b", "default"))  # row index: 0 -> b, 1 -> default, 2 -> no adapter
    gm, ctx = variant_setup(pm, capture, spec)
    assert ctx.bound == () and ctx.row_index is not None
    assert run(gm, ctx, lora.PASS) == [len(SITES)]
    counts = made(gm, "lora.mixed")
    assert counts[aten.bmm.default] == 2 * len(SITES)  # the rows' A, then their B
    assert counts[aten.index_select.default] == 2 * len(SITES)
    assert counts[aten.constant_pad_nd.default] == 2 * len(B_SITES)  # default's r=2 padded to b's 3 (A and B)
    assert not made(gm, "lora.linear")
    rows = torch.tensor([2, 0, 1])
    names = {0: ["b"], 1: ["default"], 2: []}
    with torch.no_grad():
        got = gm(x, peftfx_row_adapter=rows)
    torch.testing.assert_close(got, _reference(pm, net, x, lambda i: names[int(rows[i])]), atol=1e-6, rtol=1e-5)


def test_applies_only_to_variants_running_lora_adapters(setup):
    pm, _, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec())  # the base variant: nothing bound, nothing mixed
    before = str(gm.graph)
    assert not lora.PASS.applies(ctx)
    assert run(gm, ctx, lora.PASS) == [0] and str(gm.graph) == before
