"""The eager model pair (peftfx and PEFT on deep copies of one base model, same LoRA weights): apply,
the same-function check, eval forwards (base, adapter disabled, unmerged, fusion off) and train steps
(with the floor: the frozen base's forward and backward without any adapter).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from typing import Any, Callable

import torch

from .models import SIDES, apply_side, copy_peft_lora_into_peftfx, make_floor_step, make_train_step, no_grad_call
from .report import fmt_time, log, ratio, time_row
from .timing import interleaved, quartiles, round_ratio, timed


def run_section(bench: Any) -> dict[str, Any]:
    """Sets `bench.pm` and `bench.pp`, the adapted pair the later sections use."""
    args, base, inputs = bench.args, bench.base, bench.inputs
    result = apply_both(base, args)
    pm, pp = bench.pm, bench.pp = result.pop("models")
    unfused = same_function(pm, pp, base, inputs, args, result)
    result.update(forwards(pm, pp, unfused, base, inputs, args))
    result.update(train_steps(pm, pp, unfused, base, inputs, args))
    return result


def apply_both(base: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """One cold apply per side, then timed repeats, interleaved (each on a fresh deep copy of `base`)."""
    log("apply (one cold call each, then timed repeats, interleaved)")
    models: dict[str, torch.nn.Module] = {}
    apply_samples: dict[str, list[float]] = {s: [] for s in SIDES}
    cold: dict[str, float] = {}
    for i in range(1 + args.apply_repeats):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            fresh = copy.deepcopy(base)
            gc.collect()
            t0 = time.perf_counter()
            models[side] = apply_side(side, fresh, args)
            dt = time.perf_counter() - t0
            if i == 0:
                cold[side] = dt
            else:
                apply_samples[side].append(dt)
    trainable = {s: sum(p.numel() for p in m.parameters() if p.requires_grad) for s, m in models.items()}
    return {
        "models": (models["peftfx"], models["peft"]),
        "cold": cold,
        "apply_samples": apply_samples,
        "trainable": trainable,
    }


def same_function(
    pm: Any,
    pp: Any,
    base: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    args: argparse.Namespace,
    result: dict[str, Any],
) -> Any:
    """Give both sides the same non-zero LoRA weights and check their logits (into `result`); returns
    a third model, peftfx with the same adapter and fusion off (passes/fuse.py not run): what fusion
    buys, timed in the same rounds."""
    copy_peft_lora_into_peftfx(pm, pp, args.seed)
    unfused = apply_side("peftfx", copy.deepcopy(base), args)
    copy_peft_lora_into_peftfx(unfused, pp, args.seed)
    unfused.fusion = False
    unfused.eval()
    pm.eval()
    pp.eval()
    with torch.no_grad():
        logits_fx = pm(**inputs).logits
        logits_pf = pp(**inputs).logits
        logits_base = base(**inputs).logits
        result["unfused_diff"] = float((unfused(**inputs).logits - logits_fx).abs().max())
    max_diff = result["max_diff"] = float((logits_fx - logits_pf).abs().max())
    adapter_effect = result["adapter_effect"] = float((logits_pf - logits_base).abs().max())
    log(f"check: max |logits peftfx - PEFT| = {max_diff:.2e} (adapter moves logits by up to {adapter_effect:.2e})")
    return unfused


def forwards(
    pm: Any, pp: Any, unfused: Any, base: torch.nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """Eval forwards under no_grad: plain model, peftfx, PEFT, fusion off; then both with the adapter disabled."""
    log("eval forward (plain model, peftfx, PEFT; then both with the adapter disabled)")

    def fwd_disabled(m: torch.nn.Module) -> Callable[[], Any]:
        def run():
            with torch.no_grad(), m.disable_adapter():
                return m(**inputs)

        return run

    fw = interleaved(
        {
            "base": no_grad_call(base, inputs),
            "peftfx": no_grad_call(pm, inputs),
            "peft": no_grad_call(pp, inputs),
            "unfused": no_grad_call(unfused, inputs),
        },
        args.warmup,
        args.fwd_repeats,
    )
    fw_off = interleaved({"peftfx": fwd_disabled(pm), "peft": fwd_disabled(pp)}, args.warmup, args.fwd_repeats)
    return {"fw": fw, "fw_off": fw_off}


def train_steps(
    pm: Any, pp: Any, unfused: Any, base: torch.nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """Train steps (fwd+bwd+AdamW): one cold step per side, then interleaved with fusion off and the floor."""
    log("train step (first call each is cold: peftfx captures the train graph here)")
    steps = {s: make_train_step(m, inputs) for s, m in zip(SIDES, (pm, pp))}
    first_step = {}
    for side in SIDES[::-1]:  # PEFT first, so peftfx's capture garbage cannot land in PEFT's cold step
        gc.collect()
        first_step[side] = timed(steps[side])
    steps["unfused"] = make_train_step(unfused, inputs)
    steps["floor"] = make_floor_step(base, inputs)
    tr = interleaved(steps, args.warmup, args.repeats)
    pm.eval()
    pp.eval()
    return {"first_step": first_step, "tr": tr}


def table_rows(eager: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    trainable, cold, apply_samples = eager["trainable"], eager["cold"], eager["apply_samples"]
    fw, fw_off, first_step, tr = eager["fw"], eager["fw_off"], eager["first_step"], eager["tr"]
    base_med = statistics.median(fw["base"])
    rows = [
        {
            "metric": "trainable parameters",
            "unit": "count",
            "peftfx": trainable["peftfx"],
            "peft": trainable["peft"],
            "ratio": trainable["peftfx"] / trainable["peft"],
            "peftfx_text": f"{trainable['peftfx']:,}",
            "peft_text": f"{trainable['peft']:,}",
            "ratio_text": ratio(trainable["peftfx"], trainable["peft"]),
        },
        {
            "metric": "apply, first call in process (cold)",
            "unit": "s",
            "peftfx": cold["peftfx"],
            "peft": cold["peft"],
            "ratio": cold["peftfx"] / cold["peft"],
            "peftfx_text": fmt_time(cold["peftfx"]),
            "peft_text": fmt_time(cold["peft"]),
            "ratio_text": ratio(cold["peftfx"], cold["peft"]),
        },
        time_row(f"apply (median of {args.apply_repeats})", apply_samples["peftfx"], apply_samples["peft"]),
        {
            "metric": "eval forward, plain base model (reference)",
            "unit": "s",
            "peftfx": base_med,
            "peft": base_med,
            "ratio": 1.0,
            "peftfx_samples": fw["base"],
            "peftfx_iqr": quartiles(fw["base"]),
            "peftfx_text": fmt_time(base_med),
            "peft_text": "(same model)",
            "ratio_text": "-",
        },
        time_row("eval forward, adapter disabled", fw_off["peftfx"], fw_off["peft"]),
        time_row("eval forward, unmerged LoRA", fw["peftfx"], fw["peft"]),
    ]
    # each round of the 3-way interleave timed base, peftfx and PEFT back to back: pair within rounds
    rel = {s: round_ratio(fw[s], fw["base"]) for s in SIDES}
    rows.append(
        {
            "metric": "  ... relative to plain base forward",
            "unit": "ratio",
            "peftfx": rel["peftfx"],
            "peft": rel["peft"],
            "ratio": None,
            "peftfx_text": f"{rel['peftfx']:.2f}x",
            "peft_text": f"{rel['peft']:.2f}x",
            "ratio_text": "",
        }
    )
    rows.append(
        {
            "metric": "train step, first call (cold)",
            "unit": "s",
            "peftfx": first_step["peftfx"],
            "peft": first_step["peft"],
            "ratio": first_step["peftfx"] / first_step["peft"],
            "peftfx_text": fmt_time(first_step["peftfx"]),
            "peft_text": fmt_time(first_step["peft"]),
            "ratio_text": ratio(first_step["peftfx"], first_step["peft"]),
        }
    )
    rows.append(time_row("  eval forward, unmerged, fusion off (pm.fusion = False)", fw["unfused"], fw["peft"]))
    rows.append(time_row("train step (fwd+bwd+AdamW)", tr["peftfx"], tr["peft"]))
    rows.append(time_row("  train step, fusion off", tr["unfused"], tr["peft"]))
    floor = statistics.median(tr["floor"])
    rows.append(
        {
            "metric": "  floor: frozen base fwd+bwd, no adapter (same rounds)",
            "unit": "s",
            "peftfx": floor,
            "peft": floor,
            "ratio": None,
            "peftfx_samples": tr["floor"],
            "peftfx_iqr": quartiles(tr["floor"]),
            "peftfx_text": fmt_time(floor),
            "peft_text": "(same model)",
            "ratio_text": "-",
        }
    )
    over = {s: statistics.median(tr[s]) - floor for s in SIDES}
    rows.append(
        {
            "metric": "  train step above the floor (the adapters' cost)",
            "unit": "s",
            "peftfx": over["peftfx"],
            "peft": over["peft"],
            "ratio": over["peftfx"] / over["peft"],
            "peftfx_text": fmt_time(over["peftfx"]),
            "peft_text": fmt_time(over["peft"]),
            "ratio_text": ratio(over["peftfx"], over["peft"]),
        }
    )
    return rows
