"""Peak memory: each side runs its train steps in a fresh `multiprocessing` spawn child, which reports
its peak resident set size (VmHWM from /proc/self/status, or ru_maxrss where that is missing). A child
of its own per side, because RSS peaks of one process cannot be told apart by side.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
import warnings
from typing import Any

import torch

from .models import SIDES, apply_side, build_base, make_inputs, make_train_step
from .report import fmt_bytes, log, ratio


def _rss_status() -> dict[str, int]:
    """VmRSS / VmHWM in bytes from /proc/self/status ({} where there is no procfs)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    status = _rss_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_child(side: str, arg_dict: dict[str, Any], queue: "mp.Queue") -> None:
    """Runs in a fresh interpreter: build, apply, warm up, then measure the peak RSS of train steps."""
    try:
        warnings.filterwarnings("ignore")
        args = argparse.Namespace(**arg_dict)
        torch.set_num_threads(args.threads)
        import peft  # noqa: F401  - both children import both libraries, so baselines match
        import transformers  # noqa: F401

        import peftfx  # noqa: F401

        model = build_base(args)
        inputs = make_inputs(args)
        rss_built = _rss_status().get("VmRSS", 0)
        wrapped = apply_side(side, model, args)
        step = make_train_step(wrapped, inputs)
        for _ in range(args.mem_warmup):
            step()
        peak_total = _peak_rss()  # so far: build + apply (+ capture) + warm-up steps
        rss_before = _rss_status().get("VmRSS", 0)
        reset = _reset_peak()
        for _ in range(args.mem_steps):
            step()
        peak_steady = _peak_rss()
        peak_total = max(peak_total, peak_steady)  # whole child: build, apply, capture, all steps
        queue.put(
            {
                "side": side,
                "rss_after_build": rss_built,
                "peak_total": peak_total,
                "rss_before_steps": rss_before,
                "peak_steady": peak_steady if reset else None,
                "peak_reset": reset,
            }
        )
    except BaseException as exc:  # report rather than hang the parent
        queue.put({"side": side, "error": f"{type(exc).__name__}: {exc}"})


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Both children run at once (RSS is per process, so this does not change what is measured);
    nothing is being timed while they run."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=memory_child, args=(side, vars(args), queue)) for side in SIDES]
    for proc in procs:
        proc.start()
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + args.mem_timeout
    while len(results) < len(SIDES) and time.monotonic() < deadline:
        try:
            got = queue.get(timeout=2.0)
        except Exception:  # queue.Empty: stop once every child is gone without a result (a crash)
            if all(proc.exitcode is not None for proc in procs):
                break
            continue
        results[got["side"]] = got
    for side, proc in zip(SIDES, procs):
        results.setdefault(
            side, {"side": side, "error": f"no result within {args.mem_timeout:g} s (exit code {proc.exitcode})"}
        )
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    return results


def run_section(bench: Any) -> dict[str, dict[str, Any]]:
    log("peak memory: a fresh spawn child per side")
    return measure_memory(bench.args)


def table_rows(mem: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    def mem_row(metric: str, key: str) -> dict[str, Any]:
        vals = {s: mem[s].get(key) for s in SIDES}
        texts = {s: (fmt_bytes(vals[s]) if "error" not in mem[s] else "error") for s in SIDES}
        return {
            "metric": metric,
            "unit": "bytes",
            "peftfx": vals["peftfx"],
            "peft": vals["peft"],
            "ratio": (vals["peftfx"] / vals["peft"]) if vals["peftfx"] and vals["peft"] else None,
            "peftfx_text": texts["peftfx"],
            "peft_text": texts["peft"],
            "ratio_text": ratio(vals["peftfx"], vals["peft"]),
        }

    return [
        mem_row("peak RSS, whole child (build+apply+all steps)", "peak_total"),
        mem_row("peak RSS, steady-state train steps", "peak_steady"),
        mem_row("  (RSS after building the base model)", "rss_after_build"),
    ]
