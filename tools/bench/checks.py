"""Judging a run: the sanity checks (both sides compute the same function in every state that is timed)
and the goals of issues #3, #7, #8 and #18 (checkpointing, start-up) against this run's paired figures.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

from .checkpointing import goals as checkpointing_goals
from .models import SIDES
from .report import fmt_time
from .startup import goals as startup_goals
from .timing import round_ratio


def sanity_checks(
    max_diff: float,
    effect: float,
    unfused_diff: float,
    sw: dict,
    mg: dict,
    mx: dict,
    cc: Optional[dict],
    ql: Optional[dict] = None,
) -> dict[str, Any]:
    """Both sides compute the same function in every state that is timed (limits on max |delta logits|)."""
    items: dict[str, tuple[Any, Optional[float], Optional[bool]]] = {  # value, limit, verdict (None: value <= limit)
        "the adapter changes the logits (so the checks below mean something)": (effect, 1e-2, effect > 1e-2),
        "eager logits, peftfx vs PEFT": (max_diff, 1e-4, None),
        "eager logits, peftfx fused vs unfused": (unfused_diff, 1e-4, None),
        "logits after the set_adapter round trips, peftfx vs PEFT": (sw["logit_diff_after"], 1e-4, None),
        "merged logits, peftfx vs PEFT": (mg["merged_fx_vs_peft"], 1e-4, None),
        "merged vs unmerged logits, peftfx": (mg["merged_vs_unmerged"]["peftfx"], 1e-3, None),
        "max |W - W0| after all merge + unmerge cycles, peftfx": (mg["err_all_cycles"]["peftfx"], 1e-5, None),
        "mixed-batch logits, peftfx vs PEFT": (mx["fx_vs_peft"], 1e-4, None),
        "mixed-batch rows vs single-adapter calls, peftfx": (mx["fx_mixed_vs_single_rows"], 1e-4, None),
    }
    if ql is not None:  # PEFT pinned to bnb's dequantize path, so the same math on any CPU
        items["QLoRA eager logits, peftfx vs PEFT"] = (ql["peftfx"]["logit_diff"], 1e-4, None)
    if cc is not None:
        items["compiled logits, peftfx vs PEFT"] = (cc["fx_vs_peft"], 1e-3, None)
        probe = cc["peftfx_error_on_recompile_probe"]
        items["peftfx switches under error_on_recompile=True"] = (probe, None, probe == "ok")
    out = {
        name: {"value": v, "limit": lim, "ok": bool(ok if ok is not None else v <= lim)}
        for name, (v, lim, ok) in items.items()
    }
    return {"passed": all(c["ok"] for c in out.values()), "items": out}


def goal_lines(
    sw: dict, mg: dict, mx: dict, cc: Optional[dict], fw: dict, tr: dict, gen: Optional[dict] = None
) -> list[dict[str, Any]]:
    """Issues #3, #7 and #8's goals against this run's paired figures."""
    speedup = 1 / round_ratio(sw["samples"]["peftfx"], sw["samples"]["peft"])
    rel = {s: round_ratio(mg["fw"][s], mg["fw"]["base"]) for s in SIDES}
    mix = {s: round_ratio(mx["samples"][f"{s}_mixed"], mx["samples"][f"{s}_single"]) for s in SIDES}
    goals = [
        {
            "goal": "set_adapter",
            "value": speedup,
            "met": speedup >= 20,
            "text": f"set_adapter (with bind) {speedup:.0f}x faster than PEFT's (goal >= 20x)",
        },
        {
            "goal": "merged_forward",
            "value": rel["peftfx"],
            "met": rel["peftfx"] <= 1.02,
            "text": f"merged forward {rel['peftfx']:.3f}x the plain base forward "
            f"(goal <= 1.02x; PEFT {rel['peft']:.3f}x)",
        },
        {
            "goal": "mixed_batch",
            "value": mix["peftfx"],
            "met": mix["peftfx"] <= 1.3,
            "text": f"mixed 4-adapter batch {mix['peftfx']:.2f}x a single-adapter batch (goal <= 1.3x; "
            f"PEFT {mix['peft']:.2f}x, allowed 2x)",
        },
    ]
    eager = {s: round_ratio(fw[s], fw["base"]) for s in ("peftfx", "peft", "unfused")}
    train = {s: round_ratio(tr[s], tr["peft"]) for s in ("peftfx", "unfused", "floor")}
    goals += [
        {
            "goal": "unmerged_forward",
            "value": eager["peftfx"],
            "met": eager["peftfx"] <= 1.10,
            "text": f"unmerged eager forward {eager['peftfx']:.3f}x the base forward (goal <= 1.10x; fusion off "
            f"{eager['unfused']:.3f}x, PEFT {eager['peft']:.3f}x)",
        },
        {
            "goal": "train_step",
            "value": train["peftfx"],
            "met": train["peftfx"] <= 0.8,
            "text": f"train step {train['peftfx']:.3f}x PEFT's (goal <= 0.8x; fusion off {train['unfused']:.3f}x; "
            f"the frozen base alone, no adapter: {train['floor']:.3f}x)",
        },
    ]
    if cc is not None:
        rel_c = {s: round_ratio(cc["vs_base"][s], cc["vs_base"][f"{s}_base"]) for s in SIDES}
        goals.append(
            {
                "goal": "compiled_unmerged_forward",
                "value": rel_c["peftfx"],
                "met": rel_c["peftfx"] <= 1.05,
                "text": f"compiled unmerged forward {rel_c['peftfx']:.3f}x the compiled base forward "
                f"(goal <= 1.05x; PEFT {rel_c['peft']:.3f}x)",
            }
        )
        fx, pf = sum(cc["switch_frames"]["peftfx"]), sum(cc["switch_frames"]["peft"])
        goals.append(
            {
                "goal": "no_recompile",
                "value": fx,
                "met": fx == 0 and cc["back_frames"]["peftfx"] == 0,
                "text": f"graphs compiled by same-layout switches under torch.compile: peftfx {fx}, PEFT {pf} "
                f"(goal: 0 for peftfx); first call after a switch "
                f"{fmt_time(statistics.median(cc['switches']['peftfx']))} vs "
                f"{fmt_time(statistics.median(cc['switches']['peft']))}",
            }
        )
    if gen is not None:
        eager_gen = [c["speedup"] for c in gen["cases"]]
        compiled = [c["compiled_speedup"] for c in gen["cases"] if "compiled_speedup" in c]
        best = compiled if len(compiled) == len(eager_gen) else eager_gen
        text = f"generate tok/s {min(eager_gen):.2f}-{max(eager_gen):.2f}x PEFT's eager"
        if compiled:
            text += f", {min(compiled):.2f}-{max(compiled):.2f}x after pm.compile()"
        goals.append(
            {"goal": "generate", "value": min(best), "met": min(best) >= 1.5, "text": text + " (goal >= 1.5x)"}
        )
    return goals


def judge(results: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(sanity checks, goals) of a run's section results (see peftfx.tools.bench.run.SECTIONS)."""
    eager, many = results["eager"], results["adapters"]
    sw, mg, mx = many["switch"], many["merge"], many["mixed"]
    checks = sanity_checks(
        eager["max_diff"],
        eager["adapter_effect"],
        eager["unfused_diff"],
        sw,
        mg,
        mx,
        results["compile"],
        results["qlora"],
    )
    goals = goal_lines(sw, mg, mx, results["compile"], eager["fw"], eager["tr"], results["generate"])
    if results.get("checkpointing") is not None:
        goals += checkpointing_goals(results["checkpointing"])
    if results.get("startup") is not None:
        goals += startup_goals(results["startup"])
    return checks, goals
