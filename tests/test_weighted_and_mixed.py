"""add_weighted_adapter (linear, cat, svd) and mixed-adapter batches, against HF PEFT."""
from __future__ import annotations

import pytest
import torch

import peftfx
from conftest import batch
from oracle import twin_models


@pytest.mark.parametrize("name,configs", [
    ("llama", {"default": dict(r=4, target_modules=["q_proj", "v_proj"]),
               "b": dict(r=4, lora_alpha=12, target_modules=["v_proj", "o_proj"])}),
    ("gpt2", {"default": dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
              "b": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)}),
])
@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_adapter_matches_peft(name, configs, combination, load_model, tmp_path):
    ref, pm = twin_models(load_model, name, configs, tmp_path)
    kwargs = dict(adapters=["default", "b"], weights=[0.7, -0.4], adapter_name="mix",
                  combination_type=combination)
    ref.add_weighted_adapter(**kwargs)
    pm.add_weighted_adapter(**kwargs)
    assert pm.peft_config["mix"].r == ref.peft_config["mix"].r
    ref.set_adapter("mix")
    pm.set_adapter("mix")
    kw = batch()
    with torch.no_grad():
        torch.testing.assert_close(pm(**kw).logits, ref(**kw).logits, atol=1e-5, rtol=1e-5)


def test_weighted_linear_needs_equal_ranks(load_model, tmp_path):
    _, pm = twin_models(load_model, "llama", {"default": dict(r=4, target_modules=["q_proj"]),
                                              "b": dict(r=2, target_modules=["q_proj"])}, tmp_path)
    with pytest.raises(peftfx.ConfigError, match="needs adapters of one rank"):
        pm.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="linear")


MIXED = {"default": dict(r=4, target_modules=["q_proj", "v_proj"]),
         "b": dict(r=2, lora_alpha=6, target_modules=["v_proj", "down_proj"]),
         "c": dict(r=8, target_modules="all-linear")}


@pytest.mark.parametrize("rows", [
    ["default", "b", "__base__", "c"],
    pytest.param(["b", "b", "default", "__base__"], marks=pytest.mark.slow),  # the first row set has all three
    pytest.param(["c", "__base__", "__base__", "c"], marks=pytest.mark.slow),
])
def test_mixed_batch_matches_peft(rows, load_model, tmp_path):
    ref, pm = twin_models(load_model, "llama", MIXED, tmp_path)
    kw = batch(4, 10)
    with torch.no_grad():
        want = ref(**kw, adapter_names=rows).logits
        got = pm(**kw, adapter_names=rows).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and each row equals running that adapter alone
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name == "__base__":
                with pm.disable_adapter():
                    alone = pm(**{k: v[i:i + 1] for k, v in kw.items()}).logits
            else:
                pm.set_adapter(name)
                alone = pm(**{k: v[i:i + 1] for k, v in kw.items()}).logits
        torch.testing.assert_close(got[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_mixed_batch_is_one_graph_without_adapter_loops(load_model, tmp_path):
    _, pm = twin_models(load_model, "gpt2", {"default": dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
                                             "b": dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True)}, tmp_path)
    kw = batch(3, 7)
    with torch.no_grad():
        pm(**kw, adapter_names=["b", "default", "__base__"])
        pm(**kw, adapter_names=["default", "default", "b"])
    mixed = [gm for spec, gm in pm.state.variant_graphs() if spec.mixed]
    assert len(mixed) == 1  # the same graph served both batches
    ops = [n.target for n in mixed[0].graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.aten.bmm.default) == 2 * 2  # two layers, one batched pair each


def test_mixed_batch_errors(load_model, tmp_path):
    _, pm = twin_models(load_model, "llama", {"default": dict(r=2, target_modules=["q_proj"])}, tmp_path)
    kw = batch(2, 5)
    with pytest.raises(peftfx.ConfigError, match="adapter_names has 3 entries but the batch has 2 rows"):
        pm(**kw, adapter_names=["default"] * 3)
    with pytest.raises(peftfx.ConfigError, match=r"unknown adapter\(s\) \['nope'\]"):
        pm(**kw, adapter_names=["default", "nope"])
    pm.train()
    with pytest.raises(peftfx.ConfigError, match="for inference"):
        pm(**kw, adapter_names=["default", "default"])


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_weighted_adapter_with_rank_pattern_matches_peft(combination, load_model, tmp_path):
    """PEFT sizes the combined adapter by the largest rank any site may have (rank_pattern included)."""
    configs = {"default": dict(r=2, rank_pattern={"q_proj": 6}, target_modules=["q_proj", "v_proj"]),
               "b": dict(r=4, target_modules=["q_proj"])}
    ref, pm = twin_models(load_model, "llama", configs, tmp_path)
    kwargs = dict(adapters=["default", "b"], weights=[0.5, 1.5], adapter_name="mix", combination_type=combination)
    ref.add_weighted_adapter(**kwargs)
    pm.add_weighted_adapter(**kwargs)
    assert pm.peft_config["mix"].r == ref.peft_config["mix"].r == (10 if combination == "cat" else 6)
    ref.set_adapter("mix"), pm.set_adapter("mix")
    kw = batch()
    with torch.no_grad():
        torch.testing.assert_close(pm(**kw).logits, ref(**kw).logits, atol=1e-5, rtol=1e-5)


def test_weighted_adapter_refuses_two_trained_copies_of_one_module(load_model, tmp_path):
    configs = {"default": dict(r=2, target_modules=["query"], modules_to_save=["classifier"]),
               "b": dict(r=2, target_modules=["value"], modules_to_save=["classifier"])}
    ref, pm = twin_models(load_model, "bert", configs, tmp_path)
    kwargs = dict(adapters=["default", "b"], weights=[1.0, 1.0], adapter_name="mix", combination_type="cat")
    with pytest.raises(ValueError, match="modules_to_save"):
        ref.add_weighted_adapter(**kwargs)
    with pytest.raises(peftfx.ConfigError, match=r"each save module\(s\) \['classifier'\]"):
        pm.add_weighted_adapter(**kwargs)
    assert "mix" not in pm.peft_config


def test_mixed_batch_inside_disable_adapter_runs_the_base(load_model, tmp_path):
    ref, pm = twin_models(load_model, "llama", MIXED, tmp_path)
    kw = batch(4, 6)
    rows = ["default", "b", "__base__", "c"]
    with torch.no_grad(), pm.disable_adapter(), ref.disable_adapter():
        got = pm(**kw, adapter_names=rows).logits
        want = ref(**kw, adapter_names=rows).logits
        base = pm(**kw).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, base, atol=0, rtol=0)


def test_mixed_batch_on_a_bf16_model_matches_peft(load_model, tmp_path):
    """bf16 base, fp32 adapters (both libraries): the mixed path casts in and out like the single one."""
    ref, pm = twin_models(lambda name: load_model(name).to(torch.bfloat16), "llama", MIXED, tmp_path)
    assert next(p for n, p in ref.named_parameters() if "lora_A" in n).dtype == torch.float32
    kw = batch(4, 6)
    rows = ["c", "default", "__base__", "b"]
    with torch.no_grad():
        got = pm(**kw, adapter_names=rows).logits
        want = ref(**kw, adapter_names=rows).logits
        pm.set_adapter("c")
        alone = pm(**{k: v[:1] for k, v in kw.items()}).logits
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[:1], alone, atol=2e-2, rtol=2e-2)
