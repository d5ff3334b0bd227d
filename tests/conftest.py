"""Tiny transformers models built from configs, saved to a temporary folder and loaded from there
(as a user loads a checkpoint), so no test downloads anything."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core (pyproject.toml's addopts): one thread each, or the workers'
    # thread pools fight over the same cores.
    torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

VOCAB = 128

CONFIGS = {
    "llama": (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)),
    "gpt2": (transformers.GPT2LMHeadModel, lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
    "bert": (transformers.BertForSequenceClassification, lambda: transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=128, num_labels=3)),
    "qwen2": (transformers.Qwen2ForCausalLM, lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """name -> folder holding a saved tiny model with fixed random weights."""
    dirs = {}
    for name, (cls, make_config) in CONFIGS.items():
        torch.manual_seed(0)
        model = cls(make_config())
        folder = tmp_path_factory.mktemp(f"model-{name}")
        model.save_pretrained(folder)
        dirs[name] = str(folder)
    return dirs


@pytest.fixture
def load_model(model_dirs):
    """load_model(name) -> a fresh instance of the saved tiny model, in eval mode."""
    def load(name: str):
        cls = CONFIGS[name][0]
        return cls.from_pretrained(model_dirs[name]).eval()
    return load


def batch(b: int = 3, s: int = 9, seed: int = 1, pad: bool = True) -> dict[str, torch.Tensor]:
    """Token ids and a mask with left padding on the first row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    mask = torch.ones_like(ids)
    if pad and s > 2:
        mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def perturb_trainable(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Give every trainable tensor (adapters, trained biases, saved heads) non-default values."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def clone(model):
    return copy.deepcopy(model)


def bnb_dequantize_path(model: torch.nn.Module) -> torch.nn.Module:
    """Pin every bitsandbytes Linear4bit in `model` to bnb's dequantize + matmul path, so a reference
    computes the same on every CPU. With AVX512-BF16, bnb's Linear4bit in eval mode under no_grad
    repacks its weight in place and runs a bf16 kernel instead (other numerics; it fails unless
    in_features % blocksize == 0 and out_features % 32 == 0). bnb decides that per module: its
    `support_avx512bf16_for_cpu` is set in `__init__` from the CPU, and read in `forward`."""
    from peftfx.tools.bench.qlora import pin_dequantize_path
    pin_dequantize_path(model)
    return model
