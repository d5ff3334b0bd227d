"""passes/prompt.py alone on tiny exported transformers models: rules `embeds` (the prompt in front of the
token embeddings), `mask`, `labels` (causal LMs) and `token_types`, against HF PEFT's prompt tuning with
the same virtual tokens."""
from __future__ import annotations

import dataclasses

import pytest
import torch

peft = pytest.importorskip("peft")

import peftfx  # noqa: E402
from peftfx.passes import modules_to_save, prompt  # noqa: E402
from peftfx.rewrite.graph_inputs import keyword_inputs  # noqa: E402
from peftfx.state.variants import VariantSpec  # noqa: E402

from .helpers import aten, batch, made, made_nodes, perturb_trainable, run, tiny_hf, variant_setup  # noqa: E402

P = 3
TASK = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}


def _twins(name, folder):
    """(PEFT's prompt-tuned model, peftfx's, loaded from PEFT's checkpoint), one layer each."""
    ref = peft.get_peft_model(tiny_hf(name, num_hidden_layers=1),
                              peft.PromptTuningConfig(task_type=TASK[name], num_virtual_tokens=P))
    perturb_trainable(ref, scale=1.0)
    ref.eval().save_pretrained(str(folder))
    return ref, peftfx.load(tiny_hf(name, num_hidden_layers=1), str(folder))


def _variant(pm, inputs):
    """(graph, context) of the prompt variant for a call, and the inputs the graph takes (the user's)."""
    named = pm.state.capturer.prepare_inputs((), inputs)
    capture, call, prompt_part = pm.state.capture_for(named, training=False)
    gm, ctx = variant_setup(pm, capture, pm.state.spec_for(capture, prompt_part))
    return gm, ctx, call


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    ref, pm = _twins("llama", tmp_path_factory.mktemp("prompt-llama"))
    inputs = batch(b=2, s=5)
    inputs["labels"] = inputs["input_ids"]
    return ref, pm, inputs


def test_embeds_mask_and_labels_take_the_users_inputs(llama):
    ref, pm, inputs = llama
    gm, ctx, call = _variant(pm, inputs)
    assert ctx.prompt == ("default", "input_ids") and ctx.prompt_kind == "PROMPT_TUNING"
    assert "inputs_embeds" in keyword_inputs(gm) and "input_ids" not in keyword_inputs(gm)
    assert run(gm, ctx, prompt.PASS) == [3]  # inputs_embeds, attention_mask, labels
    assert sorted(keyword_inputs(gm)) == ["attention_mask", "input_ids", "labels", "use_cache"]
    embeds = made(gm, "prompt.embeds")
    assert embeds[aten.embedding.default] == 1 and embeds[aten.cat.default] == 1
    assert embeds["get_attr"] == 2  # the token embedding weight and the prompt
    for rule, value in (("mask", 1), ("labels", -100)):
        counts = made(gm, f"prompt.{rule}")
        assert counts[aten.cat.default] == counts[aten.new_full.default] == 1, rule
        (full,) = [n for n in made_nodes(gm, f"prompt.{rule}") if n.target is aten.new_full.default]
        assert full.args[2] == value, rule
    assert not made(gm, "prompt.token_types")
    with torch.no_grad():
        got, want = gm(**call), ref(**inputs)
    assert got.logits.shape == want.logits.shape == (2, P + 5, 128)  # PEFT: logits of length P + L
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


def test_embeds_from_the_users_inputs_embeds(llama):
    ref, pm, inputs = llama
    embeds = ref.get_base_model().get_input_embeddings()(inputs["input_ids"]).detach()
    given = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
    gm, ctx, call = _variant(pm, given)
    assert ctx.prompt == ("default", "inputs_embeds")
    assert run(gm, ctx, prompt.PASS) == [2]
    counts = made(gm, "prompt.embeds")
    assert counts[aten.cat.default] == 1 and aten.embedding.default not in counts  # the user embedded already
    assert sorted(keyword_inputs(gm)) == ["attention_mask", "inputs_embeds", "use_cache"]
    with torch.no_grad():
        torch.testing.assert_close(gm(**call).logits, ref(**given).logits, atol=1e-5, rtol=1e-5)


def test_token_types_and_no_label_padding_for_classification(tmp_path):
    ref, pm = _twins("bert", tmp_path)
    inputs = batch(b=2, s=5)
    inputs["token_type_ids"] = (torch.arange(5) >= 3).long().expand(2, 5).contiguous()
    inputs["labels"] = torch.tensor([0, 2])
    gm, ctx, call = _variant(pm, inputs)
    assert run(gm, ctx, prompt.PASS) == [3]  # embeds, mask, token types; [B] labels are not padded
    counts = made(gm, "prompt.token_types")
    assert counts[aten.cat.default] == counts[aten.new_full.default] == 1
    (full,) = [n for n in made_nodes(gm, "prompt.token_types") if n.target is aten.new_full.default]
    assert full.args[2] == 0
    assert not made(gm, "prompt.labels")
    assert ctx.saved == ("default",)  # PEFT trains a copy of the classifier head: the next pass reads it
    run(gm, ctx, modules_to_save.PASS)
    with torch.no_grad():
        got, want = gm(**call), ref(**inputs)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


def test_applies_only_to_prompt_tuning_variants(llama):
    _, pm, inputs = llama
    named = pm.state.capturer.prepare_inputs((), inputs)
    capture, _, prompt_part = pm.state.capture_for(named, training=False)
    for changes in ({"prompt": ()}, {"prompt_kind": "PREFIX_TUNING"}):
        gm, ctx = variant_setup(pm, capture, VariantSpec(prompt=prompt_part), **changes)
        before = str(gm.graph)
        assert run(gm, ctx, prompt.PASS) == [0] and str(gm.graph) == before, changes


def test_validate_needs_the_embedding_weight_in_the_graph(llama):
    _, pm, inputs = llama
    gm, ctx, _ = _variant(pm, inputs)
    other = tiny_hf("llama", seed=1, num_hidden_layers=1)  # its embedding weight is no tensor of this graph
    ctx = dataclasses.replace(ctx, model=other)
    before = str(gm.graph)
    with pytest.raises(KeyError, match="the token embedding weight is not a tensor of the captured graph"):
        run(gm, ctx, prompt.PASS)
    assert str(gm.graph) == before
