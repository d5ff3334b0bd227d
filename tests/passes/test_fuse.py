"""passes/fuse.py alone, on what passes/lora.py wrote for a tiny exported model: rule `shared_input` (one
A matmul per input that several sites read) and rule `fold_scaling` (the scale moved onto B); outputs as
the unfused graph's and as y + s·B(A(x)) by hand."""
from __future__ import annotations

import pytest
import torch

import peftfx
from peftfx.methods.lora import lora_weights
from peftfx.passes import fuse, lora
from peftfx.rewrite import provenance_of
from peftfx.state.variants import VariantSpec

from .helpers import Block, aten, block, made, run, variant_setup

SITES = list(Block.SITES)
SHARED = ["q", "k", "v"]  # read x itself; conv reads a 2-D view of it, out another input


@pytest.fixture(scope="module")
def setup():
    net, x = block()
    pm = peftfx.apply(net, peftfx.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=SITES),
                      example_inputs=(x,))
    pm.add_adapter("b", peftfx.LoraConfig(r=3, lora_alpha=3, init_lora_weights=False, target_modules=["q", "v"],
                                          lora_dropout=0.2))
    pm.eval()
    pm(x)
    return pm, net, x, pm.state.captures()[0]


def _lora_graph(pm, capture, adapters=("default",), training=False, **changes):
    spec = VariantSpec(lora=tuple(pm.state.store.layout(a) for a in adapters), training=training)
    gm, ctx = variant_setup(pm, capture, spec, bind=tuple(adapters), **changes)
    run(gm, ctx, lora.PASS)
    return gm, ctx


def _reference(pm, net, x):
    store = pm.adapters

    def call(name, h):
        y = getattr(net, name)(h)
        if name in store.sites["default"]:
            a, b = lora_weights(store, "default", name)
            y = y + store.sites["default"][name].scaling * (h @ a.T @ b.T)
        return y
    with torch.no_grad():
        return net.compute(x, call)


def test_shared_input_and_fold_scaling(setup):
    pm, net, x, capture = setup
    gm, ctx = _lora_graph(pm, capture)
    with torch.no_grad():
        unfused = gm(x)
    assert run(gm, ctx, fuse.PASS) == [1 + len(SITES)]  # x's group, then every site's scale
    shared = made(gm, "fuse.shared_input")
    assert shared[aten.cat.default] == 1  # cat(A_q, A_k, A_v)
    assert shared[aten.linear.default] == 1 and shared[aten.slice.Tensor] == len(SHARED)
    folded = made(gm, "fuse.fold_scaling")
    assert folded[aten.mul.Tensor] == folded[aten.linear.default] == len(SITES)
    # what is left of the lora pass's paths: the A matmuls of conv and out (q, k, v's became one), no scale
    lora_left = made(gm, "lora.linear")
    assert lora_left[aten.linear.default] == 2 and aten.mul.Tensor not in lora_left
    assert lora_left[aten.add.Tensor] == len(SITES)
    with torch.no_grad():
        fused = gm(x)
    torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused, _reference(pm, net, x), atol=1e-6, rtol=1e-5)


def test_fold_scaling_multiplies_weights_not_activations(setup):
    pm, _, x, capture = setup
    gm, ctx = _lora_graph(pm, capture)
    run(gm, ctx, fuse.PASS)
    muls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.mul.Tensor
            and provenance_of(n) is not None]
    assert len(muls) == len(SITES) and all(a.op == "get_attr" for n in muls for a in n.args)


def test_shared_input_groups_by_dropout_in_training(setup):
    """Training, two adapters: default's q/k/v (no dropout) and b's q/v (one shared dropout) are two groups."""
    pm, _, x, capture = setup
    gm, ctx = _lora_graph(pm, capture, adapters=("default", "b"), training=True)
    assert [n.args[1] for n in gm.graph.nodes if n.target is aten.dropout.default] == [0.2, 0.2]
    run(gm, ctx, fuse.PASS)
    assert made(gm, "fuse.shared_input")[aten.cat.default] == 2
    drops = [n for n in gm.graph.nodes if n.target is aten.dropout.default]
    assert len(drops) == 1 and provenance_of(drops[0]).qualified == "fuse.shared_input"
    gm_eval, ctx_eval = _lora_graph(pm, capture, adapters=("default", "b"))
    with torch.no_grad():
        plain = gm_eval(x)
    run(gm_eval, ctx_eval, fuse.PASS)
    assert made(gm_eval, "fuse.shared_input")[aten.cat.default] == 1  # eval: one group of five A's
    with torch.no_grad():
        torch.testing.assert_close(gm_eval(x), plain, atol=1e-6, rtol=1e-5)


def test_applies_only_with_fusion_on_and_bound_lora(setup):
    pm, _, x, capture = setup
    gm, ctx = _lora_graph(pm, capture, fuse=False)  # PeftFxModel.fusion = False
    before = str(gm.graph)
    assert run(gm, ctx, fuse.PASS) == [0] and str(gm.graph) == before
    gm, ctx = variant_setup(pm, capture, VariantSpec(mixed=("b", "default")))  # the mixed rule's paths
    run(gm, ctx, lora.PASS)
    before = str(gm.graph)
    assert run(gm, ctx, fuse.PASS) == [0] and str(gm.graph) == before
