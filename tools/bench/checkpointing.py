"""Activation checkpointing rows: peftfx and PEFT with transformers' gradient checkpointing, and peftfx's
policies against its own run without checkpointing.

Each configuration is its own model (deep copies of the bench base, the same LoRA weights on both sides):
activation bytes (tools/bench/activations.py: what the forward leaves alive for the backward) and train
step times, interleaved, paired ratios. Also runs alone: `python -m peftfx.tools.bench.checkpointing`.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Optional

import torch

from .activations import saved_activation_bytes
from .models import apply_side, copy_peft_lora_into_peftfx, make_train_step
from .report import fmt_bytes, log, time_row
from .timing import interleaved, round_ratio

# name -> (side, how checkpointing is set: None, transformers' switch, or a peftfx policy)
CONFIGS: dict[str, tuple[str, Optional[dict[str, Any]]]] = {
    "peftfx": ("peftfx", None),
    "peft": ("peft", None),
    "peftfx_gc": ("peftfx", {"hf": True}),
    "peft_gc": ("peft", {"hf": True}),
    "peftfx_selective": ("peftfx", {"policy": "selective"}),
    "peftfx_every2": ("peftfx", {"policy": "every", "every": 2}),
}
GC_KWARGS = {"use_reentrant": False}  # transformers' default


def _models(base: torch.nn.Module, args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    models: dict[str, torch.nn.Module] = {}
    reference = apply_side("peft", copy.deepcopy(base), args)
    for name, (side, how) in CONFIGS.items():
        model = copy.deepcopy(reference) if side == "peft" else apply_side("peftfx", copy.deepcopy(base), args)
        if side == "peftfx":
            copy_peft_lora_into_peftfx(model, reference, seed=0)
        if how and how.get("hf"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KWARGS)
        elif how:
            options = {k: v for k, v in how.items() if k != "policy"}
            model.checkpointing(how["policy"], **options)
        models[name] = model.train()
    return models


def run_section(bench: Any) -> dict[str, Any]:
    args = bench.args
    log("checkpointing: activation bytes and train steps, peftfx vs PEFT with transformers' checkpointing")
    models = _models(bench.base, args)
    labels = bench.inputs["input_ids"].clone()
    steps = {name: make_train_step(model, bench.inputs) for name, model in models.items()}
    for step in steps.values():  # capture and warm up before counting
        step()
    saved = {}
    for name, model in models.items():

        def loss(model: torch.nn.Module = model) -> torch.Tensor:
            return model(**bench.inputs, labels=labels).loss

        saved[name] = saved_activation_bytes(loss)
        model.zero_grad(set_to_none=True)
    samples = interleaved(steps, warmup=args.warmup, repeats=args.repeats)
    for name in models:
        log(f"  {name:18s} activations {fmt_bytes(saved[name])}")
    return {"saved": saved, "samples": samples}


def table_rows(result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    saved, samples = result["saved"], result["samples"]

    def bytes_row(metric: str, fx: str, other: str) -> dict[str, Any]:
        ratio = saved[fx] / saved[other]
        return {
            "metric": metric,
            "unit": "B",
            "peftfx": saved[fx],
            "peft": saved[other],
            "ratio": ratio,
            "peftfx_text": fmt_bytes(saved[fx]),
            "peft_text": fmt_bytes(saved[other]),
            "ratio_text": f"{ratio:.2f}x",
        }

    rows = [
        bytes_row("activations with GC (vs PEFT + GC)", "peftfx_gc", "peft_gc"),
        time_row("train step with GC (vs PEFT + GC)", samples["peftfx_gc"], samples["peft_gc"]),
        bytes_row("activations without GC (vs PEFT)", "peftfx", "peft"),
        bytes_row("  selective policy activations (peftfx vs peftfx without GC)", "peftfx_selective", "peftfx"),
        time_row(
            "  selective policy train step (peftfx vs peftfx without GC)",
            samples["peftfx_selective"],
            samples["peftfx"],
        ),
        bytes_row("  every 2nd layer activations (peftfx vs peftfx without GC)", "peftfx_every2", "peftfx"),
        time_row(
            "  every 2nd layer train step (peftfx vs peftfx without GC)", samples["peftfx_every2"], samples["peftfx"]
        ),
    ]
    return rows


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #18's checkpointing goals against this run's figures."""
    saved, samples = result["saved"], result["samples"]
    memory = saved["peftfx_gc"] / saved["peft_gc"]
    step = round_ratio(samples["peftfx_gc"], samples["peft_gc"])
    selective = saved["peftfx_selective"] / saved["peftfx"]
    selective_step = round_ratio(samples["peftfx_selective"], samples["peftfx"])
    return [
        {
            "goal": "gc_activations",
            "value": memory,
            "met": memory <= 1.1,
            "text": f"activations with GC {memory:.2f}x PEFT + GC's (goal <= 1.1x)",
        },
        {
            "goal": "gc_step",
            "value": step,
            "met": step <= 1.0,
            "text": f"train step with GC {step:.3f}x PEFT + GC's (goal <= 1.0x)",
        },
        {
            "goal": "selective_activations",
            "value": selective,
            "met": selective <= 0.5,
            "text": f"selective policy activations {selective:.2f}x no-GC (goal <= 0.5x)",
        },
        {
            "goal": "selective_step",
            "value": selective_step,
            "met": selective_step <= 1.10,
            "text": f"selective policy train step {selective_step:.3f}x no-GC (goal <= 1.10x)",
        },
    ]


def main(argv: Optional[list[str]] = None) -> None:
    from .models import build_base, make_inputs
    from .options import parse_args

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = argparse.Namespace(args=args, base=build_base(args), inputs=make_inputs(args))
    result = run_section(bench)
    for row in table_rows(result, args):
        print(f"{row['metric']:64s} {row['peftfx_text']:>10s} {row['peft_text']:>10s} {row['ratio_text']:>8s}")
    for goal in goals(result):
        print(("MET  " if goal["met"] else "MISS ") + goal["text"])


if __name__ == "__main__":
    main()
