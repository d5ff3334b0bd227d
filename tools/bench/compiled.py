"""torch.compile, on its own smaller model pair: peftfx's `pm.compile()` vs `torch.compile(peft_model)`,
the first call after switching adapters, with the graphs compiled on each side counted (same-layout
switches should compile nothing in peftfx).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
from typing import Any, Callable

import torch

from .models import (
    ADAPTERS,
    SIDES,
    add_same_adapters,
    apply_side,
    build_base,
    copy_peft_lora_into_peftfx,
    make_inputs,
    max_abs_diff,
    no_grad_call,
)
from .report import cold_row, log, relative_row, time_row, value_row
from .timing import interleaved, timed


class FrameCounter:
    """A torch.compile backend that counts the graphs Dynamo hands it, then compiles with `backend`."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.frames = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
        from torch._dynamo.backends.registry import lookup_backend

        self.frames += 1
        return lookup_backend(self.backend)(gm, example_inputs)


def bench_compile(args: argparse.Namespace) -> dict[str, Any]:
    """peftfx `pm.compile()` vs `torch.compile(peft_model)`, default options each: the first call
    (compiles), then the first call after switching to each of three new same-config adapters, and
    back to the first one, counting the graphs compiled. Inductor's on-disk caches go to a fresh
    folder, so every run compiles from scratch (only within-run cache hits count)."""
    import tempfile

    import torch._dynamo
    import torch._dynamo.utils
    import torch._inductor.config as inductor_config

    previous_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    cache = tempfile.mkdtemp(prefix="peftfx-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    previous_threads, previous_workers = torch.get_num_threads(), inductor_config.compile_threads
    # Compiled kernels take their thread count from torch at compile time. With every core in use, an
    # OpenMP kernel stalls whenever another process holds one of the cores (0.65 s instead of 1 ms per
    # call measured on the shared 2-core VM), so this section runs with --compile-threads (default 1).
    torch.set_num_threads(args.compile_threads)
    # Compile in this process: no worker pool whose processes can die and leave the benchmark waiting.
    inductor_config.compile_threads = 1
    torch._dynamo.reset()
    try:
        cargs = argparse.Namespace(**{**vars(args), "layers": args.compile_layers})
        base = build_base(cargs)
        inputs = make_inputs(cargs)
        pm = apply_side("peftfx", copy.deepcopy(base), cargs)
        pp = apply_side("peft", copy.deepcopy(base), cargs)
        copy_peft_lora_into_peftfx(pm, pp, args.seed)
        add_same_adapters(pm, pp, list(ADAPTERS[1:]), cargs)
        pm.eval()
        pp.eval()
        with torch.no_grad():
            eager = pp(**inputs).logits
        # the same model eager (uncompiled), for the "compiled vs eager" row
        eager_times = interleaved(
            {"peftfx": no_grad_call(pm, inputs), "peft": no_grad_call(pp, inputs)}, args.warmup, args.fwd_repeats
        )
        # warm up the compiler itself (imports, worker pool), so neither side's first compile pays for it
        torch.compile(lambda x: torch.relu(x @ x.T), backend=args.compile_backend)(torch.randn(8, 8))

        counters = {s: FrameCounter(args.compile_backend) for s in SIDES}
        pm.compile(backend=counters["peftfx"])
        compiled_pp = torch.compile(pp, backend=counters["peft"])
        calls = {"peftfx": no_grad_call(pm, inputs), "peft": no_grad_call(compiled_pp, inputs)}
        switch = {"peftfx": pm.set_adapter, "peft": pp.set_adapter}

        first = {}
        for side in SIDES:
            gc.collect()
            first[side] = timed(calls[side])
            for _ in range(2):  # the first calls after compiling can be slower still; not part of a switch
                calls[side]()
        frames_first = {s: counters[s].frames for s in SIDES}

        switches: dict[str, list[float]] = {s: [] for s in SIDES}
        switch_frames: dict[str, list[int]] = {s: [] for s in SIDES}
        for i, adapter in enumerate(ADAPTERS[1:]):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                switch[side](adapter)
                before = counters[side].frames
                gc.collect()
                switches[side].append(timed(calls[side]))
                switch_frames[side].append(counters[side].frames - before)
                calls[side]()
        back: dict[str, float] = {}
        back_frames: dict[str, int] = {}
        for side in SIDES[::-1]:
            switch[side]("default")
            before = counters[side].frames
            gc.collect()
            back[side] = timed(calls[side])
            back_frames[side] = counters[side].frames - before

        with torch.no_grad():
            logits = {s: calls[s]().logits for s in SIDES}
        warm = interleaved(calls, args.warmup, args.fwd_repeats)

        # peftfx: every same-layout switch again, now with recompiling made an error
        probe_error = None
        torch._dynamo.config.error_on_recompile = True
        try:
            for adapter in ("b", "default", "d", "c", "default"):
                pm.set_adapter(adapter)
                calls["peftfx"]()
        except Exception as exc:  # reported, not raised: the table still prints
            probe_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        finally:
            torch._dynamo.config.error_on_recompile = False
        pm.set_adapter("default")

        # compiled unmerged forward against the same side's compiled base forward (adapters disabled),
        # timed after the counting above: PEFT's disable compiles a new graph, peftfx's its base variant
        def disabled(side: str) -> Callable[[], Any]:
            model = pm if side == "peftfx" else pp

            def run():
                with model.disable_adapter():
                    return calls[side]()

            return run

        vs_base = interleaved({**calls, **{f"{s}_base": disabled(s) for s in SIDES}}, args.warmup, args.fwd_repeats)

        reasons: list[str] = []
        for code_reasons in torch._dynamo.utils.guard_failures.values():
            reasons.extend(str(r).splitlines()[0][:200] for r in code_reasons)
        return {
            "layers": args.compile_layers,
            "backend": args.compile_backend,
            "threads": args.compile_threads,
            "first": first,
            "frames_first": frames_first,
            "switches": switches,
            "switch_frames": switch_frames,
            "back": back,
            "back_frames": back_frames,
            "warm": warm,
            "eager": eager_times,
            "vs_base": vs_base,
            "total_frames": {s: counters[s].frames for s in SIDES},
            "peftfx_error_on_recompile_probe": probe_error or "ok",
            "guard_failure_reasons": sorted(set(reasons))[:10],
            "fx_vs_peft": max_abs_diff(logits["peftfx"], logits["peft"]),
            "compiled_vs_eager": max_abs_diff(logits["peft"], eager),
        }
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(previous_threads)
        inductor_config.compile_threads = previous_workers
        if previous_cache is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous_cache
        import shutil

        shutil.rmtree(cache, ignore_errors=True)


def run_section(bench: Any) -> dict[str, Any]:
    args = bench.args
    log(
        f"torch.compile ({args.compile_backend}), {args.compile_layers}-layer model: first call, then the "
        "first call after each switch (slow: compiles)"
    )
    return bench_compile(args)


def table_rows(cc: dict, args: argparse.Namespace) -> list[dict[str, Any]]:
    return compile_rows(cc)


def compile_rows(cc: dict) -> list[dict[str, Any]]:
    n = len(cc["switches"]["peftfx"])
    tag = f"compiled ({cc['layers']}-layer model, {cc['threads']} thread{'s' if cc['threads'] > 1 else ''})"
    return [
        cold_row(f"{tag}: first call (compiles)", cc["first"]["peftfx"], cc["first"]["peft"]),
        time_row(
            f"{tag}: first call after set_adapter(new), median of {n}", cc["switches"]["peftfx"], cc["switches"]["peft"]
        ),
        value_row(
            f"  graphs compiled by those {n} switches",
            "count",
            sum(cc["switch_frames"]["peftfx"]),
            sum(cc["switch_frames"]["peft"]),
        ),
        cold_row(f"{tag}: first call after set_adapter(default)", cc["back"]["peftfx"], cc["back"]["peft"]),
        value_row(
            "  graphs compiled by that switch back", "count", cc["back_frames"]["peftfx"], cc["back_frames"]["peft"]
        ),
        time_row(f"{tag}: eval forward (warm)", cc["warm"]["peftfx"], cc["warm"]["peft"]),
        time_row(f"{tag[:-1]}, eager): eval forward, not compiled", cc["eager"]["peftfx"], cc["eager"]["peft"]),
        relative_row(
            f"{tag}: unmerged / base forward (adapters disabled)",
            cc["vs_base"],
            {"peftfx": ("peftfx", "peftfx_base"), "peft": ("peft", "peft_base")},
        ),
        value_row(
            "  compiled / eager forward (median over medians)",
            "ratio",
            statistics.median(cc["warm"]["peftfx"]) / statistics.median(cc["eager"]["peftfx"]),
            statistics.median(cc["warm"]["peft"]) / statistics.median(cc["eager"]["peft"]),
            fmt=lambda x: f"{x:.2f}x",
        ),
    ]
