"""Start-up rows (issue 18): what a user waits for before training runs, peftfx beside HF PEFT in one process.

1. Start-up: apply + first eval forward (with attention_mask) + first train step (forward with labels and
   a backward, no optimizer), on a tiny Llama (hidden 64, 4 heads, intermediate 172, vocab 512, batch 2 x
   32 tokens) at each of `--startup-layers`, with `--startup-threads` torch threads (default 1: on a shared
   machine, multi-threaded kernels stall whenever another process holds a core, which swamped the tens of
   milliseconds PEFT's first calls take). peftfx caches its captures per model object, so every
   measurement builds a fresh model (not timed); each round times both sides, alternating which goes
   first. Before any of it, one untimed apply + calls per side on a 1-layer model: the first
   torch.export of a process pays a one-off warm-up that is not the model's start-up.
2. `pm.compile()` first call: `pm.compile()` then the first train step, against `torch.compile(peft_model)`
   and its first train step (`--compile-backend`), on the same tiny Llama at each of
   `--startup-compile-layers`; apply is done before the clock starts (its cost is row 1's). Every
   measurement gets a fresh model, `torch._dynamo.reset()` and an empty inductor cache folder, so each
   compiles from scratch; torch runs `--compile-threads` threads here, as in tools/bench/compiled.py.
   Skipped by `--no-startup-compile` (it is slow).
3. Long sequences: peak RSS of one train step (forward with labels, backward, AdamW) at batch 1 x
   `--long-seq` tokens with and without transformers' gradient checkpointing (use_reentrant=False), on the
   bench's own model sizes (--layers, --hidden, ...: the tiny model's activations would be too small to
   tell the configurations apart from the interpreter). A fresh spawn child per configuration, which runs
   one untimed step (capture, optimizer state), gives freed memory back to the OS (malloc_trim), resets
   the kernel's peak counter and reads VmHWM after the measured step (tools/bench/memory.py's method).
   Rows only, no goal.

Also runs alone: `python -m peftfx.tools.bench.startup` (the bench's flags; `--quick` for a smoke test).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing as mp
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import torch

from .memory import _peak_rss, _reset_peak, _rss_status
from .models import SIDES, apply_side, build_base, make_inputs, make_train_step
from .report import fmt_bytes, fmt_time, loadavg, log, time_row
from .timing import timed

TINY = dict(hidden=64, heads=4, intermediate=172, vocab=512, batch=2, seq=32)
GC_KWARGS = {"use_reentrant": False}  # transformers' default
# long-sequence configurations: name -> (side, gradient checkpointing on)
LONG_CONFIGS = {
    "peftfx": ("peftfx", False),
    "peft": ("peft", False),
    "peftfx_gc": ("peftfx", True),
    "peft_gc": ("peft", True),
}
STEPS = ("apply", "forward", "train")  # the parts of a start-up, in order


def _layers(n: int) -> str:
    return f"{n} layer{'s' if n != 1 else ''}"


def _tiny(args: argparse.Namespace, layers: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **TINY, "layers": layers})


def _first_calls(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(first eval forward, first train step) of a freshly adapted model, in seconds."""
    labels = inputs["input_ids"].clone()

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(**inputs)

    def train() -> None:
        model.train()
        model(**inputs, labels=labels).loss.backward()

    return timed(forward), timed(train)


def _one_startup(side: str, args: argparse.Namespace) -> dict[str, float]:
    base = build_base(args)
    inputs = make_inputs(args)
    gc.collect()
    t0 = time.perf_counter()
    model = apply_side(side, base, args)
    applied = time.perf_counter() - t0
    forward, train = _first_calls(model, inputs)
    return {"apply": applied, "forward": forward, "train": train}


def measure_startup(args: argparse.Namespace) -> dict[int, dict[str, dict[str, list[float]]]]:
    """{layers: {side: {part: [seconds per round]}}}: apply, first forward and first train step, each round
    on fresh models, both sides per round (alternating which goes first)."""
    for side in SIDES:  # untimed: torch.export's first-export warm-up, PEFT's first calls
        _one_startup(side, _tiny(args, 1))
    gc.collect()
    out: dict[int, dict[str, dict[str, list[float]]]] = {
        n: {s: {part: [] for part in STEPS} for s in SIDES} for n in args.startup_layers
    }
    for i in range(args.startup_repeats):
        for j, layers in enumerate(args.startup_layers):
            for side in SIDES if (i + j) % 2 == 0 else SIDES[::-1]:
                got = _one_startup(side, _tiny(args, layers))
                for part in STEPS:
                    out[layers][side][part].append(got[part])
                log(f"  start-up {_layers(layers):10s} {side:7s} {fmt_time(sum(got.values()))}")
    return out


def _compile_warmup(backend: str) -> None:
    """The compiler's own first use in a process (imports, its backward path), outside any measurement."""
    x = torch.randn(8, 8, requires_grad=True)
    torch.compile(lambda t: torch.relu(t @ t.T).sum(), backend=backend)(x).backward()
    torch._dynamo.reset()


def _one_compile(side: str, args: argparse.Namespace) -> float:
    """compile + the first train step (forward with labels, backward) of a fresh model, in seconds."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    base = build_base(args)
    inputs = make_inputs(args)
    labels = inputs["input_ids"].clone()
    model = apply_side(side, base, args).train()
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory(prefix="peftfx-bench-inductor-") as cache, temporary_cache_dir(cache):
        gc.collect()
        t0 = time.perf_counter()
        if side == "peftfx":
            compiled: Callable[..., Any] = model.compile(backend=args.compile_backend)
        else:
            compiled = torch.compile(model, backend=args.compile_backend)
        compiled(**inputs, labels=labels).loss.backward()
        elapsed = time.perf_counter() - t0
    torch._dynamo.reset()
    return elapsed


def measure_compile(args: argparse.Namespace) -> dict[int, dict[str, list[float]]]:
    """{layers: {side: [seconds]}} of `_one_compile`, one sample per side and layer count."""
    import torch._inductor.config as inductor_config

    previous = torch.get_num_threads(), inductor_config.compile_threads
    torch.set_num_threads(args.compile_threads)
    inductor_config.compile_threads = 1  # compile in this process (no worker pool), as compiled.py does
    try:
        _compile_warmup(args.compile_backend)
        out: dict[int, dict[str, list[float]]] = {}
        for j, layers in enumerate(args.startup_compile_layers):
            out[layers] = {s: [] for s in SIDES}
            for side in SIDES if j % 2 == 0 else SIDES[::-1]:
                out[layers][side].append(_one_compile(side, _tiny(args, layers)))
                log(f"  compile + first train step, {_layers(layers):10s} {side:7s} {fmt_time(out[layers][side][-1])}")
        return out
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(previous[0])
        inductor_config.compile_threads = previous[1]


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def long_seq_child(name: str, arg_dict: dict[str, Any], queue: "mp.Queue") -> None:
    """Runs in a fresh interpreter: one configuration's peak RSS over a train step at batch 1 x long_seq."""
    try:
        warnings.filterwarnings("ignore")
        args = argparse.Namespace(**{**arg_dict, "batch": 1, "seq": arg_dict["long_seq"]})
        torch.set_num_threads(args.threads)
        import peft  # noqa: F401  - every child imports both libraries, so baselines match
        import transformers  # noqa: F401

        import peftfx  # noqa: F401

        side, checkpointing = LONG_CONFIGS[name]
        model = apply_side(side, build_base(args), args)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KWARGS)
        step = make_train_step(model, make_inputs(args))
        step()  # capture (peftfx), AdamW state
        gc.collect()
        _malloc_trim()
        before = _rss_status().get("VmRSS", 0)
        reset = _reset_peak()
        t0 = time.perf_counter()
        step()
        elapsed = time.perf_counter() - t0
        peak = _peak_rss()
        queue.put({"name": name, "peak": peak, "rss_before": before, "peak_reset": reset, "step_s": elapsed})
    except BaseException as exc:  # report rather than hang the parent
        queue.put({"name": name, "error": f"{type(exc).__name__}: {exc}"})


def measure_long_seq(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """One spawn child per configuration, one at a time (nothing else runs beside it)."""
    ctx = mp.get_context("spawn")
    results: dict[str, dict[str, Any]] = {}
    for name in LONG_CONFIGS:
        queue = ctx.Queue()
        proc = ctx.Process(target=long_seq_child, args=(name, vars(args), queue))
        proc.start()
        try:
            results[name] = queue.get(timeout=args.mem_timeout)
        except Exception:  # queue.Empty
            results[name] = {"name": name, "error": f"no result within {args.mem_timeout:g} s"}
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join()
        got = results[name]
        log(f"  long seq {name:10s} " + (got["error"] if "error" in got else f"peak RSS {fmt_bytes(got['peak'])}"))
    return results


def run_section(bench: Any) -> dict[str, Any]:
    args = bench.args
    log(f"start-up: apply + first forward + first train step, tiny Llama at {args.startup_layers} layers")
    load = [loadavg()]
    previous = torch.get_num_threads()
    torch.set_num_threads(args.startup_threads)
    try:
        startup = measure_startup(args)
    finally:
        torch.set_num_threads(previous)
    result: dict[str, Any] = {"startup": startup, "compile": None, "compile_backend": None}
    if not args.no_startup_compile:
        log(
            f"start-up: compile + first train step ({args.compile_backend}), tiny Llama at "
            f"{args.startup_compile_layers} layers (slow: compiles)"
        )
        result["compile"] = measure_compile(args)
        result["compile_backend"] = args.compile_backend
    log(f"start-up: peak RSS of a train step at batch 1 x {args.long_seq} tokens, a spawn child per configuration")
    result["long_seq"] = measure_long_seq(args)
    result["long_seq_tokens"] = args.long_seq
    result["loadavg"] = load + [loadavg()]  # at the start and the end of the section
    return result


def _long_value(got: dict[str, Any], key: str) -> Optional[int]:
    if "error" in got:
        return None
    return got["peak"] - got["rss_before"] if key == "above" else got[key]


def _bytes_row(metric: str, got: dict[str, dict[str, Any]], fx: str, pf: str, key: str) -> dict[str, Any]:
    """peftfx's configuration `fx` beside PEFT's `pf`: `key` ("peak", or "above": peak - RSS before the step)."""
    vals = {"peftfx": _long_value(got[fx], key), "peft": _long_value(got[pf], key)}
    ratio = vals["peftfx"] / vals["peft"] if vals["peftfx"] and vals["peft"] else None
    texts = {s: "error" if vals[s] is None else fmt_bytes(vals[s]) for s in SIDES}
    return {
        "metric": metric,
        "unit": "B",
        "peftfx": vals["peftfx"],
        "peft": vals["peft"],
        "ratio": ratio,
        "peftfx_text": texts["peftfx"],
        "peft_text": texts["peft"],
        "ratio_text": "n/a" if ratio is None else f"{ratio:.2f}x",
    }


def _totals(sides: dict[str, dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per side, apply + first forward + first train step of each round."""
    return {s: [sum(parts) for parts in zip(*(sides[s][p] for p in STEPS))] for s in SIDES}


def table_rows(result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for layers, sides in result["startup"].items():
        fx, pf = sides["peftfx"], sides["peft"]
        total = _totals(sides)
        rows += [
            time_row(
                f"start-up total, {_layers(layers)}: apply + first forward + first train step",
                total["peftfx"],
                total["peft"],
            ),
            time_row(f"  start-up apply, {_layers(layers)}", fx["apply"], pf["apply"]),
            time_row(f"  start-up first eval forward, {_layers(layers)}", fx["forward"], pf["forward"]),
            time_row(f"  start-up first train step (fwd+bwd), {_layers(layers)}", fx["train"], pf["train"]),
        ]
    if result["compile"] is not None:
        for layers, sides in result["compile"].items():
            rows.append(
                time_row(
                    f"pm.compile() vs torch.compile ({result['compile_backend']}), {_layers(layers)}: "
                    "compile + first train step",
                    sides["peftfx"],
                    sides["peft"],
                )
            )
    got, n = result["long_seq"], result["long_seq_tokens"]
    rows += [
        _bytes_row(f"long seq ({n} tokens) train step peak RSS, no GC", got, "peftfx", "peft", "peak"),
        _bytes_row(f"long seq ({n} tokens) train step peak RSS, with GC", got, "peftfx_gc", "peft_gc", "peak"),
        _bytes_row("  long seq peak above RSS before the step, no GC", got, "peftfx", "peft", "above"),
        _bytes_row("  long seq peak above RSS before the step, with GC", got, "peftfx_gc", "peft_gc", "above"),
    ]
    return rows


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #18's start-up goals against this run's figures (the smallest and largest layer counts)."""
    out = []
    startup = {n: {s: statistics.median(t) for s, t in _totals(d).items()} for n, d in result["startup"].items()}
    small, big = min(startup), max(startup)
    fx, pf = startup[big]["peftfx"], startup[big]["peft"]
    if big != small:
        rel = fx / startup[small]["peftfx"]
        rel_pf = pf / startup[small]["peft"]
        out.append(
            {
                "goal": "startup_layers",
                "value": rel,
                "met": rel <= 1.5,
                "text": f"start-up {big} vs {small} layers {rel:.2f}x the {small}-layer figure "
                f"(goal <= 1.5x; PEFT {rel_pf:.2f}x)",
            }
        )
    allowed = 5 * pf + 2.0
    out.append(
        {
            "goal": "startup_vs_peft",
            "value": fx,
            "met": fx <= allowed,
            "text": f"start-up at {big} layers {fmt_time(fx)} vs PEFT's {fmt_time(pf)} "
            f"(goal <= 5x PEFT's + 2 s = {fmt_time(allowed)})",
        }
    )
    if result["compile"] is not None:
        comp = {n: {s: statistics.median(v) for s, v in d.items()} for n, d in result["compile"].items()}
        small, big = min(comp), max(comp)
        fx, pf = comp[big]["peftfx"], comp[big]["peft"]
        if big != small:
            rel = fx / comp[small]["peftfx"]
            rel_pf = pf / comp[small]["peft"]
            out.append(
                {
                    "goal": "compile_startup_layers",
                    "value": rel,
                    "met": rel <= 1.3,
                    "text": f"pm.compile() first call {big} vs {small} layers {rel:.2f}x the {small}-layer figure "
                    f"(goal <= 1.3x; PEFT + torch.compile {rel_pf:.2f}x)",
                }
            )
        vs = fx / pf
        out.append(
            {
                "goal": "compile_startup_vs_peft",
                "value": vs,
                "met": vs <= 0.5,
                "text": f"pm.compile() first call at {big} layers {vs:.2f}x PEFT + torch.compile's "
                f"({fmt_time(fx)} vs {fmt_time(pf)}; goal <= 0.5x)",
            }
        )
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from .options import parse_args

    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import peft  # noqa: F401  - imported before anything is timed
    import transformers  # noqa: F401

    import peftfx  # noqa: F401

    torch.set_num_threads(args.threads)
    result = run_section(argparse.Namespace(args=args))
    for row in table_rows(result, args):
        print(f"{row['metric']:84s} {row['peftfx_text']:>10s} {row['peft_text']:>10s} {row['ratio_text']:>8s}")
    for goal in goals(result):
        print(("MET  " if goal["met"] else "MISS ") + goal["text"])
    start, end = ("n/a" if x is None else "/".join(f"{v:.2f}" for v in x) for x in result["loadavg"])
    print(
        f"load average (1/5/15 min) at start {start}, at end {end}; start-up timed on {args.startup_threads} thread(s)"
    )


if __name__ == "__main__":
    main()
