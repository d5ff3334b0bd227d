"""transformers' Trainer and TRL's trainers with a PeftFxModel, as a PEFT user runs them (issue 17).

Checkpoints are PEFT adapters: each one loads in HF PEFT with logits equal to peftfx's at that step;
resume_from_checkpoint continues exactly; eval_loss is reported without label_names; tied embeddings
(Llama-3.2 style) save; a transformers 4-bit model trains; TRL's SFTTrainer and DPOTrainer train.
"""

from __future__ import annotations

import glob
import os

import peft
import pytest
import torch
import transformers
from conftest import VOCAB

import peftfx

SEQ = 12


class Tokens(torch.utils.data.Dataset):
    """Causal LM rows: input_ids, attention_mask and labels (the model shifts them)."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(3, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.rows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def tied_llama(tmp_path) -> str:
    """A saved tiny Llama whose lm_head shares the embedding (Llama-3.2, Qwen2.5-small, Gemma)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    folder = str(tmp_path / "tied-llama")
    model.save_pretrained(folder)
    return folder


def args(tmp_path, **overrides) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2)
    base.update(overrides)
    return transformers.TrainingArguments(**base)


def lora() -> peftfx.LoraConfig:
    return peftfx.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


def logits_in_peft(base_folder: str, adapter_folder: str, ids: torch.Tensor) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder).eval()
    ref = peft.PeftModel.from_pretrained(base, adapter_folder).eval()
    with torch.no_grad():
        return ref(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["tied-llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_trainer_checkpoints_are_peft_adapters_and_resume_exactly(kind, model_dirs, tmp_path):
    folder = tied_llama(tmp_path) if kind == "tied-llama" else model_dirs["qwen2"]
    ids = Tokens(2, seed=5).rows

    def run(**overrides):
        base = transformers.AutoModelForCausalLM.from_pretrained(folder)
        pm = peftfx.apply(base, lora())
        trainer = transformers.Trainer(
            model=pm, args=args(tmp_path, **overrides), train_dataset=Tokens(), eval_dataset=Tokens(8, seed=1))
        return pm, trainer

    at_save = {}

    class Record(transformers.TrainerCallback):
        """peftfx's logits when each checkpoint is written."""

        def on_save(self, args, state, control, model=None, **kw):
            model.eval()
            with torch.no_grad():
                at_save[state.global_step] = model(input_ids=ids).logits
            model.train()

    pm, trainer = run(load_best_model_at_end=True, metric_for_best_model="eval_loss", save_total_limit=None)
    trainer.add_callback(Record())
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3  # eval_loss without label_names=
    # checkpoints are PEFT adapters, not the whole state dict
    checkpoints = sorted(glob.glob(str(tmp_path / "run" / "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    assert [os.path.basename(c) for c in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for checkpoint in checkpoints:
        files = set(os.listdir(checkpoint))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= files
        assert "model.safetensors" not in files
        step = int(checkpoint.rsplit("-", 1)[1])  # PEFT reads it with peftfx's logits at that step
        torch.testing.assert_close(logits_in_peft(folder, checkpoint, ids), at_save[step], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(at_save[2], at_save[6])  # the adapter moved between checkpoints
    # load_best_model_at_end: the best checkpoint's adapter is what the model holds now
    best = trainer.state.best_model_checkpoint
    assert best in checkpoints
    pm.eval()
    with torch.no_grad():
        mine = pm(input_ids=ids).logits
    torch.testing.assert_close(mine, logits_in_peft(folder, best, ids), atol=1e-5, rtol=1e-5)

    # every checkpoint loads in PEFT with peftfx's logits at that step; resuming from the first
    # checkpoint reproduces the later ones exactly
    first = checkpoints[0]
    pm2, trainer2 = run(output_dir=str(tmp_path / "resumed"))
    trainer2.train(resume_from_checkpoint=first)
    for step in (4, 6):
        original = os.path.join(str(tmp_path / "run"), f"checkpoint-{step}")
        resumed = os.path.join(str(tmp_path / "resumed"), f"checkpoint-{step}")
        torch.testing.assert_close(
            logits_in_peft(folder, resumed, ids), logits_in_peft(folder, original, ids), atol=1e-5, rtol=1e-5)
    pm2.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            pm2(input_ids=ids).logits, logits_in_peft(folder, checkpoints[-1], ids), atol=1e-5, rtol=1e-5)


def test_save_model_writes_the_adapter_and_compute_metrics_gets_labels(model_dirs, tmp_path):
    seen = {}

    def metrics(prediction):
        seen["labels"] = prediction.label_ids
        return {"n": float(len(prediction.label_ids))}

    pm = peftfx.apply(transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), lora())
    trainer = transformers.Trainer(
        model=pm, args=args(tmp_path, max_steps=1, save_strategy="no", eval_strategy="no"),
        train_dataset=Tokens(), compute_metrics=metrics)
    trainer.train()
    result = trainer.evaluate(Tokens(4, seed=2))
    assert "eval_loss" in result and seen["labels"].shape == (4, SEQ)
    out = str(tmp_path / "saved")
    trainer.save_model(out)
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"} <= set(os.listdir(out))
    ids = Tokens(2, seed=5).rows
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            pm(input_ids=ids).logits, logits_in_peft(model_dirs["llama"], out, ids), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_reaches_the_model_and_trains(model_dirs, tmp_path):
    pm = peftfx.apply(transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), lora())
    trainer = transformers.Trainer(
        model=pm, args=args(tmp_path, max_steps=2, save_strategy="no", eval_strategy="no",
                            gradient_checkpointing=True), train_dataset=Tokens())
    before = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    trainer.train()
    assert pm.get_base_model().is_gradient_checkpointing
    after = pm.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_qlora_of_a_transformers_4bit_model_trains(model_dirs, tmp_path):
    pytest.importorskip("bitsandbytes")
    bits = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama"], quantization_config=bits)
    pm = peftfx.apply(base, lora())
    trainer = transformers.Trainer(
        model=pm, args=args(tmp_path, max_steps=3, save_strategy="no", eval_strategy="no"), train_dataset=Tokens())
    before = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    trainer.train()  # transformers refused: "You cannot perform fine-tuning on purely quantized models"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = pm.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary ("t0".."t127"), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2", unk_token="t1")


def _text_dataset(n: int = 12):
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(3, VOCAB, (n, SEQ), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": rows})


@pytest.mark.slow
def test_trl_sft_trainer_trains_the_adapter(model_dirs, tmp_path):
    trl = pytest.importorskip("trl")
    pm = peftfx.apply(transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), lora())
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    before = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    base_before = {k: v.clone() for k, v in pm.get_base_model().state_dict().items()}
    trainer = trl.SFTTrainer(model=pm, args=config, train_dataset=_text_dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    after = pm.adapter_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(torch.equal(base_before[k], v) for k, v in pm.get_base_model().state_dict().items())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3


@pytest.mark.slow
def test_trl_dpo_trainer_with_a_reference_model(model_dirs, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    pm = peftfx.apply(transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama"]), lora())
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()
    g = torch.Generator().manual_seed(4)

    def text():
        return " ".join(f"t{i}" for i in torch.randint(3, VOCAB, (6,), generator=g).tolist())

    data = datasets.Dataset.from_dict({
        "prompt": [text() for _ in range(8)], "chosen": [text() for _ in range(8)],
        "rejected": [text() for _ in range(8)]})
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    before = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    trainer = trl.DPOTrainer(model=pm, ref_model=ref, args=config, train_dataset=data, processing_class=tiny_tokenizer())
    trainer.train()
    after = pm.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
