"""DoRA benchmark rows: peftfx LoRA, peftfx DoRA, PEFT LoRA and PEFT DoRA side by side, in one process.

    python -m peftfx.tools.bench.dora                 # the main benchmark's sizes (its flags apply)
    python -m peftfx.tools.bench.dora --quick         # smoke test
    python -m peftfx.tools.bench.dora --dropout 0.1   # the train rows at another lora_dropout too

Four models on deep copies of the bench's Llama, the same LoRA config (`use_dora=True` for two), the same
non-zero weights on both libraries (PEFT's B randomised, then every adapter tensor, DoRA's magnitude
included, copied into peftfx). Timed, unmerged and eager, interleaved over the four sides: the eval forward
(no_grad) and the train step (forward with labels, backward, AdamW). Reported: each library's DoRA against
PEFT's DoRA, and the paired ratios DoRA / LoRA within each library (same rounds).

The train rows run at lora_dropout=0 and, when the bench's --dropout is above 0, at that value too. With
dropout, PEFT's DoRA computes the base term on dropout(x), one more base-sized matmul per site forward and
backward (peftfx matches it), so DoRA / LoRA is dominated by that there; the goal is judged at dropout 0.
The eval forward does not depend on dropout.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
from typing import Any, Optional

import torch

from .models import TARGETS, copy_peft_lora_into_peftfx, make_train_step, no_grad_call
from .report import fmt_ratio, log, render_table, time_row, value_row
from .timing import interleaved, round_ratio

SIDES4 = ("fx_lora", "fx_dora", "peft_lora", "peft_dora")
GOALS = {"eval": 1.05, "train": 1.15}  # peftfx DoRA / peftfx LoRA, paired


def _config(args: argparse.Namespace, dora: bool, dropout: float) -> dict[str, Any]:
    return dict(r=args.r, lora_alpha=args.alpha, lora_dropout=dropout, target_modules=list(TARGETS), use_dora=dora)


def make_four(base: torch.nn.Module, args: argparse.Namespace, dropout: float) -> dict[str, torch.nn.Module]:
    """The four sides on deep copies of `base`; each pair holds the same adapter weights."""
    import peft

    import peftfx

    models: dict[str, torch.nn.Module] = {}
    for dora in (False, True):
        kind = "dora" if dora else "lora"
        pp = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_config(args, dora, dropout)))
        pm = peftfx.apply(copy.deepcopy(base), peftfx.LoraConfig(**_config(args, dora, dropout)))
        copy_peft_lora_into_peftfx(pm, pp, args.seed)
        models[f"fx_{kind}"], models[f"peft_{kind}"] = pm, pp
    return models


def _diffs(models: dict[str, torch.nn.Module], base: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
    with torch.no_grad():
        logits = {name: m.eval()(**inputs).logits for name, m in models.items()}
        plain = base(**inputs).logits
    return {
        "lora": float((logits["fx_lora"] - logits["peft_lora"]).abs().max()),
        "dora": float((logits["fx_dora"] - logits["peft_dora"]).abs().max()),
        "dora_effect": float((logits["peft_dora"] - plain).abs().max()),
    }


def run_section(bench: Any) -> dict[str, Any]:
    args, base, inputs = bench.args, bench.base, bench.inputs
    log("DoRA: peftfx LoRA, peftfx DoRA, PEFT LoRA, PEFT DoRA (eval forward, then train steps)")
    dropouts = [0.0] + ([float(args.dropout)] if args.dropout > 0 else [])
    result: dict[str, Any] = {"dropouts": dropouts, "train": {}}
    for dropout in dropouts:
        models = make_four(base, args, dropout)
        if dropout == 0.0:
            result["diffs"] = _diffs(models, base, inputs)
            result["trainable"] = {
                n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()
            }
            log(
                f"  check: max |logits peftfx - PEFT| LoRA {result['diffs']['lora']:.2e}, DoRA "
                f"{result['diffs']['dora']:.2e} (DoRA moves logits by {result['diffs']['dora_effect']:.2e})"
            )
            log("  eval forward")
            result["eval"] = interleaved(
                {n: no_grad_call(m.eval(), inputs) for n, m in models.items()}, args.warmup, args.fwd_repeats
            )
        log(f"  train step, lora_dropout={dropout:g}")
        result["train"][str(dropout)] = interleaved(
            {n: make_train_step(m, inputs) for n, m in models.items()}, args.warmup, args.repeats
        )
        del models
        gc.collect()
    return result


def ratios(samples: dict[str, list[float]]) -> dict[str, float]:
    """Paired (same-round) ratios: DoRA / LoRA per library, and peftfx DoRA / PEFT DoRA."""
    return {
        "fx": round_ratio(samples["fx_dora"], samples["fx_lora"]),
        "peft": round_ratio(samples["peft_dora"], samples["peft_lora"]),
        "fx_vs_peft": round_ratio(samples["fx_dora"], samples["peft_dora"]),
    }


def _ratio_row(metric: str, samples: dict[str, list[float]], goal: Optional[float]) -> dict[str, Any]:
    r = ratios(samples)
    verdict = "" if goal is None else f"goal <= {goal:.2f}x: {'met' if r['fx'] <= goal else 'MISSED'}"
    return {
        "metric": metric,
        "unit": "ratio",
        "peftfx": r["fx"],
        "peft": r["peft"],
        "ratio": None,
        "goal": goal,
        "met": None if goal is None else r["fx"] <= goal,
        "peftfx_text": f"{r['fx']:.3f}x",
        "peft_text": f"{r['peft']:.3f}x",
        "ratio_text": verdict,
    }


def table_rows(dora: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    t, fw = dora["trainable"], dora["eval"]
    rows = [
        value_row("DoRA: trainable parameters", "count", t["fx_dora"], t["peft_dora"], lambda n: f"{n:,}"),
        value_row(
            "DoRA: max |logits peftfx - PEFT|",
            "abs",
            dora["diffs"]["dora"],
            dora["diffs"]["dora"],
            lambda x: f"{x:.1e}",
        ),
        time_row("DoRA: eval forward, unmerged", fw["fx_dora"], fw["peft_dora"]),
        time_row("  LoRA, same rounds", fw["fx_lora"], fw["peft_lora"]),
        _ratio_row("  DoRA / LoRA eval forward (paired)", fw, GOALS["eval"]),
    ]
    rows[1]["peft_text"] = f"(LoRA pair {dora['diffs']['lora']:.1e})"
    for dropout in dora["dropouts"]:
        tr = dora["train"][str(dropout)]
        goal = GOALS["train"] if dropout == 0.0 else None
        metric = f"DoRA: train step (fwd+bwd+AdamW), lora_dropout={dropout:g}"
        rows += [
            time_row(metric, tr["fx_dora"], tr["peft_dora"]),
            time_row("  LoRA, same rounds", tr["fx_lora"], tr["peft_lora"]),
            _ratio_row("  DoRA / LoRA train step (paired)", tr, goal),
        ]
    return rows


def goal_lines(dora: dict[str, Any]) -> list[str]:
    lines = []
    e = ratios(dora["eval"])
    lines.append(
        f"[{'met' if e['fx'] <= GOALS['eval'] else 'MISSED'}] peftfx DoRA eval forward {e['fx']:.3f}x peftfx "
        f"LoRA's (goal <= {GOALS['eval']}x); PEFT DoRA / PEFT LoRA {e['peft']:.3f}x; peftfx DoRA / PEFT "
        f"DoRA {fmt_ratio(e['fx_vs_peft'])}"
    )
    for dropout in dora["dropouts"]:
        r = ratios(dora["train"][str(dropout)])
        judged = dropout == 0.0
        mark = ("met" if r["fx"] <= GOALS["train"] else "MISSED") if judged else "info"
        note = f"goal <= {GOALS['train']}x" if judged else "not judged: PEFT's path adds a base matmul on dropout(x)"
        lines.append(
            f"[{mark}] peftfx DoRA train step {r['fx']:.3f}x peftfx LoRA's at lora_dropout={dropout:g} "
            f"({note}); PEFT DoRA / PEFT LoRA {r['peft']:.3f}x; peftfx DoRA / PEFT DoRA "
            f"{fmt_ratio(r['fx_vs_peft'])}"
        )
    return lines


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    import json
    import warnings

    from .options import parse_args
    from .run import setup

    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    bench = setup(args)
    result = run_section(bench)
    rows = table_rows(result, args)
    print()
    print(
        f"DoRA vs LoRA, peftfx and HF PEFT: r={args.r} alpha={args.alpha:g}, {len(TARGETS)} linear targets; Llama "
        f"layers={args.layers} hidden={args.hidden} intermediate={args.intermediate} vocab={args.vocab}; batch "
        f"{args.batch} x {args.seq}; {args.threads} threads; medians of {args.fwd_repeats} eval / {args.repeats} "
        f"train interleaved rounds after {args.warmup} warm-up calls per side; ratios paired within rounds"
    )
    print(render_table(rows))
    print()
    for line in goal_lines(result):
        print("  " + line)
    timed = [("eval", result["eval"])] + [(f"train@{d:g}", result["train"][str(d)]) for d in result["dropouts"]]
    for name, samples in timed:
        print(
            f"  {name}: "
            + ", ".join(
                f"{s} {statistics.median(samples[s]) * 1e3:.1f} ms (min {min(samples[s]) * 1e3:.1f})" for s in SIDES4
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": {k: v for k, v in vars(args).items() if k != "json"},
                    "result": result,
                    "rows": [{k: v for k, v in r.items() if not k.endswith("_text")} for r in rows],
                },
                f,
                indent=2,
            )
    return result


if __name__ == "__main__":
    main()
