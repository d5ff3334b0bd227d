"""Training through the rewritten graph: only adapters learn, the base stays bit-identical."""
from __future__ import annotations

import peft
import pytest
import torch
import transformers

import peftfx
from peftfx.methods.lora import lora_weights
from conftest import VOCAB, batch
from peftfx.rewrite import made_by


def _train(pm, steps=8, lr=1e-2, **inputs):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    losses = []
    for _ in range(steps):
        loss = pm(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", [pytest.param("llama", marks=pytest.mark.slow), "gpt2"])  # llama: tests/test_trainer.py
def test_training_lowers_loss_and_leaves_base_untouched(name, load_model):
    model = load_model(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = peftfx.apply(model, peftfx.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    kw = batch(4, 12)
    torch.manual_seed(0)  # dropout: the same masks on every run, whatever ran before this test

    def eval_loss() -> float:  # without dropout noise, so the comparison is of the model, not of the masks
        pm.eval()
        with torch.no_grad():
            return pm(labels=kw["input_ids"], **kw).loss.item()

    before_loss = eval_loss()
    _train(pm, labels=kw["input_ids"], **kw)
    assert eval_loss() < before_loss * 0.9
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n


def test_gradients_reach_only_adapters_and_trained_biases(load_model):
    pm = peftfx.apply(load_model("bert"), peftfx.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS",
                                                             bias="lora_only"))
    pm.train()
    out = pm(**batch(), labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    with_grad = sorted(n for n, p in pm.named_parameters() if p.grad is not None)
    trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    assert with_grad == trainable
    assert any("lora_A" in n for n in with_grad) and any("modules_to_save" in n for n in with_grad)
    assert any(n.endswith("query.bias") for n in with_grad)


def test_loss_equals_models_own_loss(load_model):
    base = load_model("llama")
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(target_modules=["q_proj"]))
    kw = batch()
    labels = kw["input_ids"].clone()
    labels[:, :3] = -100
    with torch.no_grad():
        assert torch.equal(pm(**kw, labels=labels).loss, base(**kw, labels=labels).loss)


def test_dropout_runs_in_train_mode_only(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(target_modules=["q_proj"], lora_dropout=0.5,
                                                              init_lora_weights=False))
    kw = batch()
    with torch.no_grad():
        pm.eval()
        e1, e2 = pm(**kw).logits, pm(**kw).logits
        pm.train()
        t1, t2 = pm(**kw).logits, pm(**kw).logits
    assert torch.equal(e1, e2)
    assert not torch.equal(t1, t2)
    ops = [n.target for n in pm.graph_module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.dropout.default in ops
    pm.eval()
    pm(**kw)
    lora_ops = [n.target for n in pm.graph_module.graph.nodes
                if made_by(n, "lora")]
    assert torch.ops.aten.dropout.default not in lora_ops


@pytest.mark.slow  # 80 forward passes; test_dropout_runs_in_train_mode_only stays in the default run
def test_dropout_matches_peft_statistics(load_model):
    """Same dropout probability as PEFT: with A = B = identity-like weights the train-mode output
    variance over many seeds matches PEFT's within sampling error."""
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(target_modules=["q_proj"], lora_dropout=0.3,
                                                              init_lora_weights=False))
    ref = peft.get_peft_model(load_model("llama"), peft.LoraConfig(target_modules=["q_proj"], lora_dropout=0.3,
                                                                 init_lora_weights=False))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                key = n.replace("base_model.model.", "").replace(".default.weight", "")
                site, which = key.rsplit(".lora_", 1)
                a, b = lora_weights(pm.adapters, "default", site)
                p.copy_(a if which == "A" else b)
    kw = batch(2, 6)
    pm.train(), ref.train()
    stds = []
    for model in (pm, ref):
        torch.manual_seed(0)
        with torch.no_grad():
            outs = torch.stack([model(**kw).logits for _ in range(40)])
        stds.append(outs.std(0).mean().item())
    assert stds[0] > 0 and abs(stds[0] - stds[1]) / stds[1] < 0.15


def test_trainer_runs_and_learns(load_model, tmp_path):
    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.arange(i, i + 16) % VOCAB
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=3, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=pm, args=args, train_dataset=Data())
    result = trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) >= 10 and logged[-1] < logged[0]
    assert result.global_step == 12
    # the whole run was served by one training graph
    assert len([c for c in pm.state.captures() if c.signature.training]) == 1
