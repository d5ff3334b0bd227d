"""Reporting: rows of the side-by-side table (a dict per metric with both sides' figures and their
texts), the table itself, the printed report and the JSON file. `log` writes progress to stderr, so
stdout holds only the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

from .models import SIDES, TARGETS, default_threads
from .timing import quartiles, round_ratio

RATIO_NOTE = (
    "ratios: for timed rows, the median over rounds of (peftfx time / PEFT time) within the same "
    "interleaved round (the '... relative to plain base' row likewise pairs with the base call of the "
    "same round); on a shared machine bursts of foreign load hit both sides of a round alike, so this "
    "is steadier than a ratio of medians (listed below the table). Cold rows: one sample each."
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_bytes(b: Optional[float]) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x (PEFT / peftfx = {1 / x:.0f}x)"


def render_table(rows: list[dict[str, Any]]) -> str:
    header = ("metric", "peftfx", "PEFT", "peftfx / PEFT")  # see RATIO_NOTE
    body = [(r["metric"], r["peftfx_text"], r["peft_text"], r["ratio_text"]) for r in rows]
    widths = [max(len(str(x[i])) for x in [header] + body) for i in range(4)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(b) for b in body])


def time_row(metric: str, fx: list[float], pf: list[float], unit: str = "s") -> dict[str, Any]:
    mfx, mpf = statistics.median(fx), statistics.median(pf)
    paired = round_ratio(fx, pf)
    return {
        "metric": metric,
        "unit": unit,
        "peftfx": mfx,
        "peft": mpf,
        "ratio": paired,
        "ratio_of_medians": mfx / mpf,
        "paired_ratio": paired,
        "peftfx_samples": fx,
        "peft_samples": pf,
        "peftfx_iqr": quartiles(fx),
        "peft_iqr": quartiles(pf),
        "peftfx_text": fmt_time(mfx),
        "peft_text": fmt_time(mpf),
        "ratio_text": fmt_ratio(paired),
    }


def cold_row(metric: str, fx: float, pf: float) -> dict[str, Any]:
    """One sample per side (a first call)."""
    return {
        "metric": metric,
        "unit": "s",
        "peftfx": fx,
        "peft": pf,
        "ratio": fx / pf,
        "peftfx_text": fmt_time(fx),
        "peft_text": fmt_time(pf),
        "ratio_text": fmt_ratio(fx / pf),
    }


def relative_row(metric: str, samples: dict[str, list[float]], sides: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Per side, the median over rounds of (time of one call / time of its reference call in the same round)."""
    rel = {s: round_ratio(samples[num], samples[den]) for s, (num, den) in sides.items()}
    return {
        "metric": metric,
        "unit": "ratio",
        "peftfx": rel["peftfx"],
        "peft": rel["peft"],
        "ratio": None,
        "peftfx_text": f"{rel['peftfx']:.3f}x",
        "peft_text": f"{rel['peft']:.3f}x",
        "ratio_text": "",
    }


def value_row(metric: str, unit: str, fx: Any, pf: Any, fmt: Callable[[Any], str] = str) -> dict[str, Any]:
    """A measured quantity that is not a time (a count, an error)."""
    return {
        "metric": metric,
        "unit": unit,
        "peftfx": fx,
        "peft": pf,
        "ratio": None,
        "peftfx_text": fmt(fx),
        "peft_text": fmt(pf),
        "ratio_text": "-",
    }


def loadavg() -> Optional[tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def _fmt_load(load: Optional[tuple[float, float, float]]) -> str:
    return "n/a" if load is None else "/".join(f"{x:.2f}" for x in load)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(args: argparse.Namespace, load: tuple) -> dict[str, Any]:
    """Versions, threads and CPU of this run; `load` is the load average at its start and end."""
    import peft
    import transformers

    import peftfx

    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peftfx": peftfx.__version__,
        "threads": args.threads,
        "cpus": default_threads(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "loadavg_start": load[0],
        "loadavg_end": load[1],
    }


def print_report(
    args: argparse.Namespace,
    n_base: int,
    results: dict[str, Any],
    rows: list[dict[str, Any]],
    checks: dict[str, Any],
    goals: list[dict[str, Any]],
    elapsed: float,
    load: tuple,
) -> dict[str, Any]:
    """Print the settings, the checks, the table, the goals and the spread of every timed row to stdout;
    return everything as the JSON-able result (`--json` writes it)."""
    eager, mem = results["eager"], results["memory"]
    max_diff, adapter_effect = eager["max_diff"], eager["adapter_effect"]
    env = environment(args, load)
    table = render_table(rows)
    print()
    print(
        f"peftfx vs HF PEFT -- LoRA r={args.r} alpha={args.alpha:g} dropout={args.dropout:g} on "
        f"{len(TARGETS)} linear targets ({', '.join(TARGETS)})"
    )
    print(
        f"model: LlamaForCausalLM (random init, fp32, CPU) layers={args.layers} hidden={args.hidden} "
        f"intermediate={args.intermediate} heads={args.heads} vocab={args.vocab} "
        f"({n_base / 1e6:.1f}M params); input batch {args.batch} x {args.seq} tokens"
    )
    print(
        f"env: {env['date']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"peftfx {env['peftfx']}, {args.threads} threads / {env['cpus']} CPUs ({env['processor']})"
    )
    print(
        f"timing: medians of interleaved repeats after {args.warmup} warm-up calls per side: "
        f"{args.fwd_repeats} per eval forward, {args.repeats} per train step, "
        f"{args.apply_repeats} per apply (after 1 cold apply)"
    )
    if mem is not None:
        print(
            f"memory: peak RSS (VmHWM) of a fresh spawn child per side; 'steady' = peak over {args.mem_steps} "
            f"train steps after {args.mem_warmup} warm-up steps, with the peak counter reset between"
        )
        for side in SIDES:
            if "error" in mem[side]:
                print(f"  memory child {side} failed: {mem[side]['error']}")
    print(RATIO_NOTE)
    print(
        f"check: max |logits peftfx - PEFT| = {max_diff:.2e} with identical non-zero LoRA weights "
        f"(the adapter moves logits by up to {adapter_effect:.2e})"
    )
    for name, c in checks["items"].items():
        print(
            f"check {'ok  ' if c['ok'] else 'FAIL'} {name}: {c['value']:.2e} (limit {c['limit']:.0e})"
            if isinstance(c["value"], float)
            else f"check {'ok  ' if c['ok'] else 'FAIL'} {name}: {c['value']}"
        )
    print()
    print(table)
    print()
    print("goals (issues #3, #7, #8 and #18):")
    for g in goals:
        print(f"  [{'met' if g['met'] else 'MISSED'}] {g['text']}")
    print()
    print_spread(rows)
    print(
        f"total wall time {elapsed:.0f} s; load average (1/5/15 min) at start {_fmt_load(load[0])}, "
        f"at end {_fmt_load(load[1])} (this benchmark itself adds about {args.threads} at the end)"
    )

    many = results["adapters"]
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "env": env,
        "check": {
            "max_abs_logit_diff": max_diff,
            "adapter_max_abs_logit_effect": adapter_effect,
            "passed": checks["passed"],
            "items": checks["items"],
        },
        "goals": goals,
        "sections": {
            "switch": many["switch"],
            "merge": many["merge"],
            "mixed": many["mixed"],
            "compile": results["compile"],
        },
        "rows": [{k: v for k, v in r.items() if not k.endswith("_text")} for r in rows],
        "memory": mem,
        "table": table,
        "wall_s": elapsed,
    }


def print_spread(rows: list[dict[str, Any]]) -> None:
    print("spread of the timed rows: min [interquartile range] (peftfx | PEFT); ratio of the medians")

    def spread(side: str, r: dict[str, Any]) -> str:
        lo, hi = r[f"{side}_iqr"]
        return f"{fmt_time(min(r[f'{side}_samples']))} [{fmt_time(lo)} - {fmt_time(hi)}]"

    width = max(len(r["metric"].strip()) for r in rows if "peftfx_iqr" in r)
    for r in rows:
        if "peftfx_iqr" in r:
            other = spread("peft", r) if "peft_iqr" in r else "(same model)"
            paired = f"  |  {r['ratio_of_medians']:.3g}x" if "ratio_of_medians" in r else ""
            print(f"  {r['metric'].strip():<{width}} {spread('peftfx', r)}  |  {other}{paired}")


def write_json(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {path}")
