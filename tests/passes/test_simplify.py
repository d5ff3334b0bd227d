"""passes/simplify.py alone on a tiny exported model: rules `noop_cast`, `identity` and
`grouped_attention`; the simplified graph computes bit for bit what the model computes, and training
variants are left alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftfx import PeftFxModel
from peftfx.passes import simplify
from peftfx.state.variants import VariantSpec

from .helpers import aten, ops, run, stamped, variant_setup

SDPA = aten.scaled_dot_product_attention.default


class GroupedAttention(nn.Module):
    """4 query heads over 2 key/value heads, repeated as transformers' repeat_kv does, with a no-op cast
    and two identity ops on the way (and `v * 2.0`, which is none)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.kv = nn.Linear(16, 16)

    def forward(self, x):
        q = (self.q(x).to(torch.float32) * 1 + 0).view(x.shape[0], -1, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(x.shape[0], -1, 4, 4).transpose(1, 2).chunk(2, dim=1)

        def repeat_kv(t):
            b, heads, s, d = t.shape
            return t[:, :, None, :, :].expand(b, heads, 2, s, d).reshape(b, heads * 2, s, d)
        return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v * 2.0))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, x = GroupedAttention().eval(), torch.randn(3, 5, 16)
    pm = PeftFxModel(model, example_inputs=(x,))
    pm.eval()
    pm(x)
    train = pm.state.capturer.get(pm.state.capturer.prepare_inputs((x,), {}), training=True)
    return pm, model, x, pm.state.reference_capture(), train


def test_rules_drop_no_ops_and_read_grouped_heads(setup):
    pm, model, x, capture, _ = setup
    gm, ctx = variant_setup(pm, capture, VariantSpec())
    counted = [aten.to.dtype, aten.mul.Tensor, aten.add.Tensor, aten.expand.default, aten.reshape.default, SDPA]
    before = ops(gm, counted)
    assert before[aten.to.dtype] == 1 and before[aten.expand.default] == 2 and before[aten.reshape.default] == 2
    assert run(gm, ctx, simplify.PASS) == [1 + 2 + 1]  # the cast, x * 1 and + 0, the attention op
    after = ops(gm, counted)
    assert after[aten.to.dtype] == 0  # noop_cast
    assert after[aten.mul.Tensor] == before[aten.mul.Tensor] - 1 == 1  # identity: v * 2.0 stays
    assert after[aten.add.Tensor] == before[aten.add.Tensor] - 1
    # grouped_attention: sdpa reads the grouped heads (repeat_kv's expand and reshape are dead)
    assert after[aten.expand.default] == after[aten.reshape.default] == 0
    (sdpa,) = [n for n in gm.graph.nodes if n.target is SDPA]
    assert sdpa.kwargs.get("enable_gqa") is True
    assert not stamped(gm)  # provenance=False: the graph is still the model's own nodes
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_each_rule_alone(setup):
    """Each rule's own effect, with only that rule in the table (so a rule is checked by itself)."""
    pm, model, x, capture, _ = setup
    effects = {"noop_cast": lambda c: c[aten.to.dtype] == 0,
               "identity": lambda c: c[aten.add.Tensor] == 0 and c[aten.mul.Tensor] == 1,
               "grouped_attention": lambda c: c[aten.expand.default] == 0}
    for rule in simplify.PASS.rules:
        gm, ctx = variant_setup(pm, capture, VariantSpec())
        only = type(simplify.PASS)(simplify.PASS.name, rules=(rule,), applies=simplify.PASS.applies,
                                   provenance=False)
        run(gm, ctx, only)
        assert effects[rule.name](ops(gm)), rule.name
        with torch.no_grad():
            assert torch.equal(gm(x), model(x)), rule.name


def test_training_variants_are_not_simplified(setup):
    pm, _, x, _, train = setup
    gm, ctx = variant_setup(pm, train, VariantSpec(training=True))
    before = str(gm.graph)
    assert not simplify.PASS.applies(ctx)
    assert run(gm, ctx, simplify.PASS) == [0] and str(gm.graph) == before
