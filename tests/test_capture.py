"""Capture: no weight copies, dynamic batch/sequence, another graph for another set of inputs."""
from __future__ import annotations

import torch

import peftfx
from conftest import batch
from peftfx.rewrite import made_by, provenance_of


def test_graph_shares_the_users_parameters(load_model):
    model = load_model("llama")
    pm = peftfx.apply(model, peftfx.LoraConfig(target_modules=["q_proj"]))
    graph_params = dict(pm.graph_module.named_parameters())
    for name, p in model.named_parameters():
        assert graph_params[name] is p  # the same tensor object: no copy of the base weights


def test_dynamic_batch_and_sequence_use_one_graph(load_model):
    model = load_model("llama")
    pm = peftfx.apply(model, peftfx.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.eval()
    for b, s in [(3, 17), (1, 1), (5, 2), (2, 64)]:
        kw = batch(b, s, seed=b * s)
        with torch.no_grad():
            got = pm(**kw).logits
            with pm.disable_adapter():
                base = pm(**kw).logits
        assert got.shape == (b, s, model.config.vocab_size)
        torch.testing.assert_close(base, model(**kw).logits, atol=1e-6, rtol=1e-6)
    eval_captures = [c for c in pm.state.captures() if not c.signature.training]
    assert len(eval_captures) == 1


def test_other_inputs_capture_another_graph(load_model):
    base = load_model("bert")
    pm = peftfx.apply(load_model("bert"), peftfx.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    pm.eval()
    kw = batch()
    token_types = torch.zeros_like(kw["input_ids"])
    token_types[:, 4:] = 1
    positions = torch.arange(9).flip(0).expand(3, 9)
    with torch.no_grad():
        for extra in ({}, {"token_type_ids": token_types}, {"position_ids": positions}):
            torch.testing.assert_close(pm(**kw, **extra).logits, base(**kw, **extra).logits, atol=1e-6, rtol=1e-6)
    assert len({c.signature for c in pm.state.captures()}) == 3


def test_disable_adapter_runs_the_base_graph(load_model):
    pm = peftfx.apply(load_model("gpt2"), peftfx.LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    pm.fusion = False  # the lora pass's own nodes, before passes/fuse.py rewrites them (tests/test_fuse.py)
    pm.eval()
    pm(**batch())
    adapted = pm.graph_module
    with pm.disable_adapter():
        base_graph = pm.graph_module
    tagged = [n for n in base_graph.graph.nodes if provenance_of(n) is not None]
    assert tagged == [] and not hasattr(base_graph, "peftfx")
    inserted = [n for n in adapted.graph.nodes if made_by(n, "lora")]
    # per site: get_attr A, linear, get_attr B, linear, get_attr scaling, mul, add; 2 layers
    assert sorted(str(n.target).split(".")[-1] if n.op == "get_attr" else str(n.target) for n in inserted) == sorted(
        ["aten.linear.default"] * 4 + ["aten.mul.Tensor", "aten.add.Tensor"] * 2 + ["A", "B", "scaling"] * 2)


def test_labels_need_no_capture_of_their_own_and_give_the_models_loss(load_model, tmp_path):
    """A causal LM's loss is computed outside the graph with the model's own loss function: calls with and
    without labels share one capture per mode, and the loss (num_items_in_batch too, as Trainer passes it)
    equals PEFT's, first in the output as the model returns it."""
    import peft

    from oracle import twin_models

    for name in ("llama", "gpt2"):
        ref, pm = twin_models(load_model, name, {"default": dict(r=4, lora_alpha=8, target_modules="all-linear")},
                              tmp_path / name)
        kw = batch(3, 9)
        labels = kw["input_ids"].clone()
        labels[0, :3] = -100
        for training in (False, True) if name == "llama" else (False,):  # GPT-2 has dropout in train mode
            ref.train(training), pm.train(training)
            pm(**kw)
            captures = len(pm.state.captures())
            for extra in ({}, {"num_items_in_batch": torch.tensor(11)}):
                out, want = pm(labels=labels, **kw, **extra), ref(labels=labels, **kw, **extra)
                torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(out[0], want.loss, rtol=1e-6, atol=1e-6)
                assert list(out.keys())[:2] == ["loss", "logits"]
            assert len(pm.state.captures()) == captures, name
        plain = pm(labels=labels, return_dict=False, **kw)  # a tuple: the loss first, then the logits
        want = ref(labels=labels, return_dict=False, **kw)
        torch.testing.assert_close(plain[0], want[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(plain[1], want[1], rtol=1e-5, atol=1e-5)
        assert isinstance(ref, peft.PeftModel)


def test_a_call_without_attention_mask_shares_the_masked_capture(load_model, tmp_path):
    """transformers treats a missing mask as ones; peftfx passes ones, so no second capture, and the
    logits are PEFT's without a mask."""
    from oracle import twin_models

    ref, pm = twin_models(load_model, "llama", {"default": dict(r=4, lora_alpha=8, target_modules="all-linear")},
                          tmp_path)
    kw = batch(2, 9, pad=False)
    with torch.no_grad():
        pm(**kw)
        captures = len(pm.state.captures())
        torch.testing.assert_close(pm(input_ids=kw["input_ids"]).logits, ref(input_ids=kw["input_ids"]).logits,
                                   rtol=1e-5, atol=1e-5)
        embeds = pm.get_base_model().get_input_embeddings()(kw["input_ids"])
        torch.testing.assert_close(pm(inputs_embeds=embeds).logits, ref(inputs_embeds=embeds).logits,
                                   rtol=1e-5, atol=1e-5)
    assert len(pm.state.captures()) == captures + 1  # inputs_embeds is another input: one more, not two
