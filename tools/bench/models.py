"""The models both sides run: a random-init Llama from the bench's sizes, LoRA applied with one config by
peftfx or by HF PEFT, train steps, and the weight copy that makes both sides compute the same function.

Shared by the main process and the memory children (peftfx.tools.bench.memory), so both build the same.
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from peftfx import PeftFxModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIDES = ("peftfx", "peft")
ADAPTERS = ("default", "b", "c", "d")  # "default" is the one apply made; b, c, d share its config (one layout)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    """The base model: a Llama from a LlamaConfig, random weights from a fixed seed, no download."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


def make_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def lora_fields(args: argparse.Namespace) -> dict[str, Any]:
    return dict(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=list(TARGETS))


def apply_side(side: str, model: torch.nn.Module, args: argparse.Namespace) -> Union[PeftFxModel, PeftModel]:
    if side == "peftfx":
        import peftfx

        return peftfx.apply(model, peftfx.LoraConfig(**lora_fields(args)))
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(**lora_fields(args)))


def make_train_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], lr: float = 1e-4) -> Callable[[], float]:
    """forward with labels + backward + AdamW step over the trainable parameters, in train mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    labels = inputs["input_ids"].clone()

    def step() -> float:
        model.train()
        out = model(**inputs, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    return step


def make_floor_step(base: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> Callable[[], float]:
    """The least a LoRA train step can cost: the frozen base model's forward with labels and a backward
    through every layer, made to run by one trainable scalar on the embedding output (no adapter)."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    gate = torch.nn.Parameter(torch.ones(()))
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out * gate)
    model.floor_gate = gate  # registered, so the step's optimizer finds it
    return make_train_step(model, inputs)


def copy_peft_lora_into_peftfx(pm: PeftFxModel, pp: PeftModel, seed: int, randomize: Optional[set[str]] = None) -> int:
    """Give PEFT's adapters non-zero B (so they change outputs; `randomize`: which adapters, default
    all), then copy every LoRA weight into peftfx's store. PEFT names:
    base_model.model.<site>.lora_X.<adapter>.weight; peftfx's store uses <site>.lora_X.<adapter>.weight."""
    g = torch.Generator().manual_seed(seed + 2)
    store = dict(pm.adapters.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in pp.named_parameters():
            if "lora_" not in name:
                continue
            if ".lora_B." in name and (randomize is None or name.split(".lora_B.")[1].split(".")[0] in randomize):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            key = name[len("base_model.model.") :]
            store[key].copy_(p)
            copied += 1
    if copied != len(store):
        raise RuntimeError(f"copied {copied} LoRA tensors from PEFT, peftfx has {len(store)}")
    return copied


def add_same_adapters(pm: PeftFxModel, pp: PeftModel, names: list[str], args: argparse.Namespace) -> None:
    """Add adapters of the bench's LoRA config on both sides (inactive, as in PEFT), with equal non-zero weights."""
    import peft

    import peftfx

    for name in names:
        pm.add_adapter(name, peftfx.LoraConfig(**lora_fields(args)))
        pp.add_adapter(name, peft.LoraConfig(**lora_fields(args)))
    copy_peft_lora_into_peftfx(pm, pp, args.seed + 10, randomize=set(names))
    # PEFT makes a new adapter's dropout modules in training mode even inside an eval model, so an eval
    # model with a new adapter would run dropout on it: put both sides back in the mode they were in.
    for m in (pm, pp):
        m.train(m.training)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def no_grad_call(model: Callable[..., Any], inputs: dict[str, Any], **extra: Any) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return model(**inputs, **extra)

    return run


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the non-LoRA parameters, by name (PEFT's wrapped layers renamed to the plain names)."""
    return {
        n.replace("base_model.model.", "").replace(".base_layer.", "."): p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" not in n and "modules_to_save" not in n
    }


def max_weight_error(model: torch.nn.Module, w0: dict[str, torch.Tensor]) -> float:
    now = base_weights(model)
    return max(float((now[n] - w).abs().max()) for n, w in w0.items())
