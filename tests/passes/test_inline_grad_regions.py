"""passes/inline_grad_regions.py alone on a tiny exported model: rule `no_grad` copies a
`torch.no_grad()` region's nodes inline and detaches its outputs; outputs and gradients stay the model's."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from peftfx import PeftFxModel
from peftfx.passes import inline_grad_regions
from peftfx.state.variants import VariantSpec

from .helpers import aten, ops, run, stamped, variant_setup

HOP = torch.ops.higher_order.wrap_with_set_grad_enabled


class Gated(nn.Module):
    """A linear scaled by a gate and shifted by a wave, both computed under no_grad (like rotary tables)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("freq", torch.linspace(0.5, 2.0, 8))

    def forward(self, x):
        with torch.no_grad():
            gate = torch.sigmoid(x.mean(-1, keepdim=True))
            wave = torch.cos(x * self.freq)
        return self.lin(x) * gate + wave


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, x = Gated().eval(), torch.randn(3, 4, 8)
    pm = PeftFxModel(model, example_inputs=(x,))
    pm.eval()
    pm(x)
    return pm, model, x, pm.state.reference_capture()


def _regions(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is HOP]


def test_no_grad_region_is_inlined_and_detached(setup):
    pm, model, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec())
    (region,) = _regions(gm)
    body = region.args[1].target
    outputs = [u for u in region.users if u.target is operator.getitem]
    assert len(outputs) == 2
    assert run(gm, ctx, inline_grad_regions.PASS) == [1]
    assert not _regions(gm) and not hasattr(gm, body)  # the region's call and its submodule are gone
    assert not any(n.target is operator.getitem for n in gm.graph.nodes)
    counts = ops(gm)
    assert counts[aten.detach.default] == 2  # one per output the graph read
    assert counts[aten.sigmoid.default] == counts[aten.cos.default] == counts[aten.mean.dim] == 1  # the body, inline
    assert not stamped(gm)  # provenance=False: the copied nodes are the model's own
    # same outputs; the gradient reaches x only through the linear, as in eager PyTorch under no_grad
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = gm(x1), model(x2)
    assert torch.equal(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)


def test_applies_only_where_torch_has_the_region_op(setup, monkeypatch):
    pm, _, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec())
    monkeypatch.setattr(inline_grad_regions, "_HOP", None)
    before = str(gm.graph)
    assert run(gm, ctx, inline_grad_regions.PASS) == [0] and str(gm.graph) == before


def test_validate_refuses_a_region_reading_module_state(setup):
    pm, _, x, capture = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec())
    (region,) = _regions(gm)
    body = getattr(gm, region.args[1].target)  # make the body read a buffer of its own
    body.register_buffer("offset", torch.ones(()))
    output = next(n for n in body.graph.nodes if n.op == "output")
    with body.graph.inserting_before(output):
        offset = body.graph.get_attr("offset")
        first = output.args[0][0]
        shifted = body.graph.call_function(aten.add.Tensor, (first, offset))
    output.args = ((shifted, *output.args[0][1:]),)
    body.recompile()
    before = str(gm.graph)
    with pytest.raises(NotImplementedError, match=rf"no-grad region reads module state: {region.args[1].target} "
                                                  r"reads \['offset'\]"):
        run(gm, ctx, inline_grad_regions.PASS)
    assert str(gm.graph) == before and _regions(gm)
