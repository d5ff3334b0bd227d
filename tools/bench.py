"""Side-by-side benchmark: peftfx vs HF PEFT, LoRA on a randomly initialised Llama, CPU, fp32.

Run from the repository root:

    python -m tools.bench                 # default sizes (a few minutes on 2 cores)
    python -m tools.bench --no-compile    # without the torch.compile section (the slow one)
    python -m tools.bench --quick         # tiny smoke test (about a minute)
    python tools/bench.py --json out.json # same, and write every sample as JSON

Both sides run in one process on deep copies of the same base model (PEFT mutates the model it
wraps) with the same LoRA config. Timings are medians of interleaved repeats (peftfx, PEFT, peftfx,
PEFT, ...) after warm-up, measured with time.perf_counter. Peak memory is measured separately: each
side runs its train steps in a fresh `multiprocessing` spawn child, which reports its peak resident
set size (VmHWM from /proc/self/status, or ru_maxrss where that is missing).

Then three more adapters of the same config are added on both sides, and the state operations are timed
the same way: set_adapter, merge + unmerge (with the weight error left behind), forward with the adapter
merged (against the plain model), and a mixed batch of four adapters (against a one-adapter batch).
Last, a smaller model pair runs under torch.compile: the first call after switching adapters, with the
graphs compiled on each side counted. Every state timed is checked to compute the same logits on both
sides (the `check` lines; `check.passed` in the JSON).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Optional

try:
    import peftfx  # noqa: F401
except ImportError:  # `python tools/bench.py` puts tools/ first on sys.path, not the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import peftfx  # noqa: F401

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIDES = ("peftfx", "peft")

# --------------------------------------------------------------------------------------------------
# setup shared by the main process and the memory children


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    """The base model: a Llama from a LlamaConfig, random weights from a fixed seed, no download."""
    import transformers
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config)
    return model.to(torch.float32).eval()


def make_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def lora_fields(args: argparse.Namespace) -> dict[str, Any]:
    return dict(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=list(TARGETS))


def apply_side(side: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
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


def make_floor_step(base: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], float]:
    """The least a LoRA train step can cost: the frozen base model's forward with labels and a backward
    through every layer, made to run by one trainable scalar on the embedding output (no adapter)."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    gate = torch.nn.Parameter(torch.ones(()))
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out * gate)
    model.floor_gate = gate  # registered, so the step's optimizer finds it
    return make_train_step(model, inputs)


# --------------------------------------------------------------------------------------------------
# timing


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm up each function, then time them round-robin (A, B, C, A, B, C, ...); seconds per call.
    The round's starting side rotates, so no side always runs right after the same other one."""
    names = list(fns)
    gc.collect()
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(timed(fns[name]))
    return samples


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


# --------------------------------------------------------------------------------------------------
# memory: one spawn child per side


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
        import peftfx  # noqa: F401
        import transformers  # noqa: F401
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
        queue.put({"side": side, "rss_after_build": rss_built, "peak_total": peak_total,
                   "rss_before_steps": rss_before,
                   "peak_steady": peak_steady if reset else None, "peak_reset": reset})
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
        results.setdefault(side, {"side": side, "error": f"no result within {args.mem_timeout:g} s "
                                                        f"(exit code {proc.exitcode})"})
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    return results


# --------------------------------------------------------------------------------------------------
# sanity check: the two sides compute the same function


def copy_peft_lora_into_peftfx(pm: torch.nn.Module, pp: torch.nn.Module, seed: int,
                               randomize: Optional[set[str]] = None) -> int:
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
            key = name[len("base_model.model."):]
            store[key].copy_(p)
            copied += 1
    if copied != len(store):
        raise RuntimeError(f"copied {copied} LoRA tensors from PEFT, peftfx has {len(store)}")
    return copied


def add_same_adapters(pm: torch.nn.Module, pp: torch.nn.Module, names: list[str], args: argparse.Namespace) -> None:
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


# --------------------------------------------------------------------------------------------------
# many adapters: switching, merging, mixed batches (the eager model pair of the main sections)

ADAPTERS = ("default", "b", "c", "d")  # "default" is the one apply made; b, c, d share its config (one layout)


def no_grad_call(model: Callable[..., Any], inputs: dict[str, Any], **extra: Any) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return model(**inputs, **extra)
    return run


def looped(fn: Callable[[], Any], n: int) -> Callable[[], Any]:
    """n calls per timed sample, for operations of a few milliseconds or less (divide the samples by n)."""
    def run():
        for _ in range(n):
            fn()
    return run


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the non-LoRA parameters, by name (PEFT's wrapped layers renamed to the plain names)."""
    return {n.replace("base_model.model.", "").replace(".base_layer.", "."): p.detach().clone()
            for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n}


def max_weight_error(model: torch.nn.Module, w0: dict[str, torch.Tensor]) -> float:
    now = base_weights(model)
    return max(float((now[n] - w).abs().max()) for n, w in w0.items())


def bench_switch(pm: Any, pp: Any, inputs: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """set_adapter default -> b -> default, both adapters loaded on each side.

    peftfx's set_adapter only records the choice (and requires_grad); the variant lookup and the slot
    bank's re-binding to the chosen adapter's tensors happen at the next call. So the headline figure
    also does that lookup after each switch (`pm.graph_module` runs the same `_variant` lookup and bind
    a call does), which is the whole cost of switching; the bare set_adapter is reported too.
    PEFT's set_adapter does all its work (walking every LoRA layer) at once."""
    no_grad_call(pm, inputs)()  # the last call's capture (eval) is the one graph_module looks up

    def fx_bound():
        pm.set_adapter("b")
        pm.graph_module  # noqa: B018 - the lookup + bind of the next call
        pm.set_adapter("default")
        pm.graph_module  # noqa: B018

    def fx_bare():
        pm.set_adapter("b")
        pm.set_adapter("default")

    def pf():
        pp.set_adapter("b")
        pp.set_adapter("default")

    gc.collect()
    cold = {"peftfx": timed(fx_bound), "peft": timed(pf)}  # b has never been bound / activated before
    n = args.switch_inner
    raw = interleaved({"peftfx": looped(fx_bound, n), "peftfx_bare": looped(fx_bare, n), "peft": looped(pf, n)},
                      args.warmup, args.repeats)
    samples = {k: [x / n for x in v] for k, v in raw.items()}
    assert pm.active_adapters == ["default"] and pp.active_adapters == ["default"]
    with torch.no_grad():  # the switched-back state computes what PEFT's does
        diff = max_abs_diff(pm(**inputs).logits, pp(**inputs).logits)
    return {"cold": cold, "samples": samples, "logit_diff_after": diff}


def bench_merge(pm: Any, pp: Any, base: torch.nn.Module, inputs: dict[str, torch.Tensor],
                args: argparse.Namespace) -> dict[str, Any]:
    """merge_adapter() + unmerge_adapter() of the active adapter, then forwards with it merged."""
    models = {"peftfx": pm, "peft": pp}
    w0 = {s: base_weights(m) for s, m in models.items()}
    with torch.no_grad():
        unmerged = {s: m(**inputs).logits for s, m in models.items()}

    def cycle(m: Any) -> Callable[[], None]:
        def run():
            m.merge_adapter()
            m.unmerge_adapter()
        return run

    cycles = {s: cycle(m) for s, m in models.items()}
    gc.collect()
    cold = {s: timed(cycles[s]) for s in SIDES}
    err_one = {s: max_weight_error(models[s], w0[s]) for s in SIDES}
    samples = interleaved(cycles, args.warmup, args.repeats)
    n_cycles = 1 + args.warmup + args.repeats
    err_all = {s: max_weight_error(models[s], w0[s]) for s in SIDES}

    for m in models.values():
        m.merge_adapter()
    with torch.no_grad():
        merged = {s: m(**inputs).logits for s, m in models.items()}
    fw = interleaved({"base": no_grad_call(base, inputs), "peftfx": no_grad_call(pm, inputs),
                      "peft": no_grad_call(pp, inputs)}, args.warmup, args.fwd_repeats)
    for m in models.values():
        m.unmerge_adapter()
    return {"cold": cold, "samples": samples, "err_one_cycle": err_one, "err_all_cycles": err_all,
            "n_cycles": n_cycles, "fw": fw,
            "merged_vs_unmerged": {s: max_abs_diff(merged[s], unmerged[s]) for s in SIDES},
            "merged_fx_vs_peft": max_abs_diff(merged["peftfx"], merged["peft"])}


def bench_mixed(pm: Any, pp: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One batch whose rows use adapters default, b, c, d (adapter_names=) vs the same batch with the
    single active adapter; at least 4 rows, so every adapter has one."""
    rows = max(args.batch, len(ADAPTERS))
    inputs = make_inputs(argparse.Namespace(**{**vars(args), "batch": rows}))
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(rows)]
    for m in (pm, pp):
        m.set_adapter("default")
    gc.collect()
    cold = {"peftfx": timed(no_grad_call(pm, inputs, adapter_names=names)),  # builds the mixed variant
            "peft": timed(no_grad_call(pp, inputs, adapter_names=names))}
    with torch.no_grad():
        got = {"peftfx": pm(**inputs, adapter_names=names).logits, "peft": pp(**inputs, adapter_names=names).logits}
        per_row = 0.0  # each mixed row against a plain call with that row's adapter active (peftfx)
        for adapter in ADAPTERS:
            pm.set_adapter(adapter)
            alone = pm(**inputs).logits
            idx = [i for i, n in enumerate(names) if n == adapter]
            per_row = max(per_row, max_abs_diff(got["peftfx"][idx], alone[idx]))
        pm.set_adapter("default")
    fns = {"peftfx_single": no_grad_call(pm, inputs), "peftfx_mixed": no_grad_call(pm, inputs, adapter_names=names),
           "peft_single": no_grad_call(pp, inputs), "peft_mixed": no_grad_call(pp, inputs, adapter_names=names)}
    samples = interleaved(fns, args.warmup, args.fwd_repeats)
    return {"rows": rows, "names": names, "cold": cold, "samples": samples,
            "fx_vs_peft": max_abs_diff(got["peftfx"], got["peft"]), "fx_mixed_vs_single_rows": per_row}


# --------------------------------------------------------------------------------------------------
# torch.compile: the first call after switching adapters (its own, smaller model pair)


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
        eager_times = interleaved({"peftfx": no_grad_call(pm, inputs), "peft": no_grad_call(pp, inputs)},
                                  args.warmup, args.fwd_repeats)
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
            for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
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

        reasons = []
        for code_reasons in torch._dynamo.utils.guard_failures.values():
            reasons.extend(str(r).splitlines()[0][:200] for r in code_reasons)
        return {"layers": args.compile_layers, "backend": args.compile_backend, "threads": args.compile_threads,
                "first": first,
                "frames_first": frames_first, "switches": switches, "switch_frames": switch_frames,
                "back": back, "back_frames": back_frames, "warm": warm, "eager": eager_times, "vs_base": vs_base,
                "total_frames": {s: counters[s].frames for s in SIDES},
                "peftfx_error_on_recompile_probe": probe_error or "ok",
                "guard_failure_reasons": sorted(set(reasons))[:10],
                "fx_vs_peft": max_abs_diff(logits["peftfx"], logits["peft"]),
                "compiled_vs_eager": max_abs_diff(logits["peft"], eager)}
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


# --------------------------------------------------------------------------------------------------
# reporting


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


def render_table(rows: list[dict[str, Any]]) -> str:
    header = ("metric", "peftfx", "PEFT", "peftfx / PEFT")  # see RATIO_NOTE
    body = [(r["metric"], r["peftfx_text"], r["peft_text"], r["ratio_text"]) for r in rows]
    widths = [max(len(str(x[i])) for x in [header] + body) for i in range(4)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(b) for b in body])


def round_ratio(num: list[float], den: list[float]) -> float:
    """Median over interleaved rounds of num / den timed in the same round."""
    return statistics.median(a / b for a, b in zip(num, den))


def time_row(metric: str, fx: list[float], pf: list[float], unit: str = "s") -> dict[str, Any]:
    mfx, mpf = statistics.median(fx), statistics.median(pf)
    paired = round_ratio(fx, pf)
    return {"metric": metric, "unit": unit, "peftfx": mfx, "peft": mpf, "ratio": paired,
            "ratio_of_medians": mfx / mpf, "paired_ratio": paired,
            "peftfx_samples": fx, "peft_samples": pf,
            "peftfx_iqr": quartiles(fx), "peft_iqr": quartiles(pf),
            "peftfx_text": fmt_time(mfx), "peft_text": fmt_time(mpf), "ratio_text": fmt_ratio(paired)}


def qlora_section(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """tools/bench_qlora.py's measurement on this run's model sizes: side -> its row."""
    from peftfx.tools.bench_qlora import parse_args as qlora_args, qlora_rows
    q = qlora_args([])
    q.hidden, q.layers, q.intermediate, q.heads, q.vocab = args.hidden, args.layers, args.intermediate, args.heads, args.vocab
    q.batch, q.seq, q.rank, q.threads = args.batch, args.seq, args.r, args.threads
    q.repeats, q.warmup = max(3, args.repeats // 2), 1
    return {row["side"]: row for row in qlora_rows(q)}


def qlora_table_rows(ql: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    fx, pf = ql["peftfx"], ql["peft"]
    weights = {"metric": "QLoRA: model tensors (fp32 model: " + fmt_bytes(fx["fp32_model_bytes"]) + ")",
               "unit": "bytes", "peftfx": fx["model_bytes"], "peft": pf["model_bytes"],
               "ratio": fx["model_bytes"] / pf["model_bytes"], "peftfx_text": fmt_bytes(fx["model_bytes"]),
               "peft_text": fmt_bytes(pf["model_bytes"]), "ratio_text": ratio(fx["model_bytes"], pf["model_bytes"])}
    rows = [weights,
            time_row("QLoRA: eval forward (PEFT pinned to bnb's dequantize path)", fx["forward_samples"],
                     pf["forward_samples"]),
            time_row("QLoRA: train step (fwd+bwd+AdamW)", fx["train_step_samples"], pf["train_step_samples"])]
    metric = "QLoRA: eval forward vs PEFT on bnb's packed AVX512-BF16 kernel"
    if "peft@packed" in ql:  # only a CPU with AVX512-BF16 has that kernel (tools/bench_qlora.py)
        fxp, pfp = ql["peftfx@packed"], ql["peft@packed"]
        rows.append(time_row(f"{metric} (intermediate {fxp['intermediate']})", fxp["forward_samples"],
                             pfp["forward_samples"]))
    else:
        rows.append({"metric": metric, "unit": "s", "peftfx": None, "peft": None, "ratio": None,
                     "peftfx_text": "n/a", "peft_text": "n/a (no such kernel on this CPU)", "ratio_text": "-"})
    return rows


def generate_rows(gen: dict[str, Any]) -> list[dict[str, Any]]:
    """tokens/s per case (higher is better, so the ratio column is peftfx / PEFT throughput)."""
    def row(metric: str, fx: float, pf: float) -> dict[str, Any]:
        return {"metric": metric, "unit": "tok/s", "peftfx": fx, "peft": pf, "ratio": fx / pf,
                "peftfx_text": f"{fx:.0f}", "peft_text": f"{pf:.0f}", "ratio_text": f"{fx / pf:.2f}x"}

    rows = []
    for case in gen["cases"]:
        same = "" if case["same_tokens"] else " (TOKENS DIFFER)"
        rows.append(row(f"generate tok/s, {case['targets']}, batch {case['batch']} (x = peftfx/PEFT){same}",
                        case["peftfx_tok_s"], case["peft_tok_s"]))
        if "compiled_tok_s" in case:
            rows.append(row(f"  ... peftfx after pm.compile() (warm-up incl. compile {case['warmup_with_compile_s']} s)",
                            case["compiled_tok_s"], case["peft_tok_s"]))
    return rows


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x (PEFT / peftfx = {1 / x:.0f}x)"


def cold_row(metric: str, fx: float, pf: float) -> dict[str, Any]:
    """One sample per side (a first call)."""
    return {"metric": metric, "unit": "s", "peftfx": fx, "peft": pf, "ratio": fx / pf,
            "peftfx_text": fmt_time(fx), "peft_text": fmt_time(pf), "ratio_text": fmt_ratio(fx / pf)}


def relative_row(metric: str, samples: dict[str, list[float]], sides: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Per side, the median over rounds of (time of one call / time of its reference call in the same round)."""
    rel = {s: round_ratio(samples[num], samples[den]) for s, (num, den) in sides.items()}
    return {"metric": metric, "unit": "ratio", "peftfx": rel["peftfx"], "peft": rel["peft"], "ratio": None,
            "peftfx_text": f"{rel['peftfx']:.3f}x", "peft_text": f"{rel['peft']:.3f}x", "ratio_text": ""}


def value_row(metric: str, unit: str, fx: Any, pf: Any, fmt: Callable[[Any], str] = str) -> dict[str, Any]:
    """A measured quantity that is not a time (a count, an error)."""
    return {"metric": metric, "unit": unit, "peftfx": fx, "peft": pf, "ratio": None,
            "peftfx_text": fmt(fx), "peft_text": fmt(pf), "ratio_text": "-"}


def state_rows(sw: dict, mg: dict, mx: dict, args: argparse.Namespace) -> list[dict[str, Any]]:
    n, k = mg["n_cycles"], len(ADAPTERS)
    s, m = sw["samples"], mx["samples"]
    return [
        cold_row("set_adapter default->b->default, first time (cold)", sw["cold"]["peftfx"], sw["cold"]["peft"]),
        time_row("set_adapter default->b->default (+ peftfx's bind)", s["peftfx"], s["peft"]),
        time_row("  bare set_adapter calls (peftfx binds at next call)", s["peftfx_bare"], s["peft"]),
        cold_row("merge + unmerge, first call (cold)", mg["cold"]["peftfx"], mg["cold"]["peft"]),
        time_row("merge_adapter + unmerge_adapter", mg["samples"]["peftfx"], mg["samples"]["peft"]),
        value_row("  max |W - W0| after 1 merge + unmerge", "abs", mg["err_one_cycle"]["peftfx"],
                  mg["err_one_cycle"]["peft"], lambda e: f"{e:.1e}"),
        value_row(f"  max |W - W0| after {n} merge + unmerge", "abs", mg["err_all_cycles"]["peftfx"],
                  mg["err_all_cycles"]["peft"], lambda e: f"{e:.1e}"),
        time_row("eval forward, adapter merged", mg["fw"]["peftfx"], mg["fw"]["peft"]),
        relative_row("  ... relative to plain base forward", mg["fw"],
                     {"peftfx": ("peftfx", "base"), "peft": ("peft", "base")}),
        cold_row(f"mixed batch of {k} adapters, first call (cold)", mx["cold"]["peftfx"], mx["cold"]["peft"]),
        time_row(f"eval forward, 1 adapter, batch {mx['rows']}", m["peftfx_single"], m["peft_single"]),
        time_row(f"eval forward, mixed {k} adapters, batch {mx['rows']}", m["peftfx_mixed"], m["peft_mixed"]),
        relative_row("  ... mixed / single-adapter batch", m,
                     {"peftfx": ("peftfx_mixed", "peftfx_single"), "peft": ("peft_mixed", "peft_single")}),
    ]


def compile_rows(cc: dict) -> list[dict[str, Any]]:
    n = len(cc["switches"]["peftfx"])
    tag = f"compiled ({cc['layers']}-layer model, {cc['threads']} thread{'s' if cc['threads'] > 1 else ''})"
    return [
        cold_row(f"{tag}: first call (compiles)", cc["first"]["peftfx"], cc["first"]["peft"]),
        time_row(f"{tag}: first call after set_adapter(new), median of {n}", cc["switches"]["peftfx"],
                 cc["switches"]["peft"]),
        value_row(f"  graphs compiled by those {n} switches", "count", sum(cc["switch_frames"]["peftfx"]),
                  sum(cc["switch_frames"]["peft"])),
        cold_row(f"{tag}: first call after set_adapter(default)", cc["back"]["peftfx"], cc["back"]["peft"]),
        value_row("  graphs compiled by that switch back", "count", cc["back_frames"]["peftfx"],
                  cc["back_frames"]["peft"]),
        time_row(f"{tag}: eval forward (warm)", cc["warm"]["peftfx"], cc["warm"]["peft"]),
        time_row(f"{tag[:-1]}, eager): eval forward, not compiled", cc["eager"]["peftfx"], cc["eager"]["peft"]),
        relative_row(f"{tag}: unmerged / base forward (adapters disabled)", cc["vs_base"],
                     {"peftfx": ("peftfx", "peftfx_base"), "peft": ("peft", "peft_base")}),
        value_row("  compiled / eager forward (median over medians)", "ratio",
                  statistics.median(cc["warm"]["peftfx"]) / statistics.median(cc["eager"]["peftfx"]),
                  statistics.median(cc["warm"]["peft"]) / statistics.median(cc["eager"]["peft"]),
                  fmt=lambda x: f"{x:.2f}x"),
    ]


def sanity_checks(max_diff: float, effect: float, unfused_diff: float, sw: dict, mg: dict, mx: dict,
                  cc: Optional[dict], ql: Optional[dict] = None) -> dict[str, Any]:
    """Both sides compute the same function in every state that is timed (limits on max |delta logits|)."""
    items = {
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
    out = {name: {"value": v, "limit": lim, "ok": bool(ok if ok is not None else v <= lim)}
           for name, (v, lim, ok) in items.items()}
    return {"passed": all(c["ok"] for c in out.values()), "items": out}


def goal_lines(sw: dict, mg: dict, mx: dict, cc: Optional[dict], fw: dict, tr: dict,
               gen: Optional[dict] = None) -> list[dict[str, Any]]:
    """Issues #3, #7 and #8's goals against this run's paired figures."""
    speedup = 1 / round_ratio(sw["samples"]["peftfx"], sw["samples"]["peft"])
    rel = {s: round_ratio(mg["fw"][s], mg["fw"]["base"]) for s in SIDES}
    mix = {s: round_ratio(mx["samples"][f"{s}_mixed"], mx["samples"][f"{s}_single"]) for s in SIDES}
    goals = [
        {"goal": "set_adapter", "value": speedup, "met": speedup >= 20,
         "text": f"set_adapter (with bind) {speedup:.0f}x faster than PEFT's (goal >= 20x)"},
        {"goal": "merged_forward", "value": rel["peftfx"], "met": rel["peftfx"] <= 1.02,
         "text": f"merged forward {rel['peftfx']:.3f}x the plain base forward (goal <= 1.02x; PEFT {rel['peft']:.3f}x)"},
        {"goal": "mixed_batch", "value": mix["peftfx"], "met": mix["peftfx"] <= 1.3,
         "text": f"mixed 4-adapter batch {mix['peftfx']:.2f}x a single-adapter batch (goal <= 1.3x; "
                 f"PEFT {mix['peft']:.2f}x, allowed 2x)"},
    ]
    eager = {s: round_ratio(fw[s], fw["base"]) for s in ("peftfx", "peft", "unfused")}
    train = {s: round_ratio(tr[s], tr["peft"]) for s in ("peftfx", "unfused", "floor")}
    goals += [
        {"goal": "unmerged_forward", "value": eager["peftfx"], "met": eager["peftfx"] <= 1.10,
         "text": f"unmerged eager forward {eager['peftfx']:.3f}x the base forward (goal <= 1.10x; fusion off "
                 f"{eager['unfused']:.3f}x, PEFT {eager['peft']:.3f}x)"},
        {"goal": "train_step", "value": train["peftfx"], "met": train["peftfx"] <= 0.8,
         "text": f"train step {train['peftfx']:.3f}x PEFT's (goal <= 0.8x; fusion off {train['unfused']:.3f}x; "
                 f"the frozen base alone, no adapter: {train['floor']:.3f}x)"},
    ]
    if cc is not None:
        rel_c = {s: round_ratio(cc["vs_base"][s], cc["vs_base"][f"{s}_base"]) for s in SIDES}
        goals.append({"goal": "compiled_unmerged_forward", "value": rel_c["peftfx"], "met": rel_c["peftfx"] <= 1.05,
                      "text": f"compiled unmerged forward {rel_c['peftfx']:.3f}x the compiled base forward "
                              f"(goal <= 1.05x; PEFT {rel_c['peft']:.3f}x)"})
        fx, pf = sum(cc["switch_frames"]["peftfx"]), sum(cc["switch_frames"]["peft"])
        goals.append({"goal": "no_recompile", "value": fx, "met": fx == 0 and cc["back_frames"]["peftfx"] == 0,
                      "text": f"graphs compiled by same-layout switches under torch.compile: peftfx {fx}, PEFT {pf} "
                              f"(goal: 0 for peftfx); first call after a switch "
                              f"{fmt_time(statistics.median(cc['switches']['peftfx']))} vs "
                              f"{fmt_time(statistics.median(cc['switches']['peft']))}"})
    if gen is not None:
        eager = [c["speedup"] for c in gen["cases"]]
        compiled = [c["compiled_speedup"] for c in gen["cases"] if "compiled_speedup" in c]
        best = compiled if len(compiled) == len(eager) else eager
        text = f"generate tok/s {min(eager):.2f}-{max(eager):.2f}x PEFT's eager"
        if compiled:
            text += f", {min(compiled):.2f}-{max(compiled):.2f}x after pm.compile()"
        goals.append({"goal": "generate", "value": min(best), "met": min(best) >= 1.5, "text": text + " (goal >= 1.5x)"})
    return goals


# --------------------------------------------------------------------------------------------------


RATIO_NOTE = ("ratios: for timed rows, the median over rounds of (peftfx time / PEFT time) within the same "
              "interleaved round (the '... relative to plain base' row likewise pairs with the base call of the "
              "same round); on a shared machine bursts of foreign load hit both sides of a round alike, so this "
              "is steadier than a ratio of medians (listed below the table). Cold rows: one sample each.")

QUICK = dict(compile_layers=1, compile_backend="aot_eager", switch_inner=10, layers=1, hidden=64, intermediate=172, heads=4, vocab=512, batch=2, seq=16, repeats=3, fwd_repeats=3,
             warmup=1, apply_repeats=1, mem_warmup=1, mem_steps=1)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--hidden", type=int, default=512, help="hidden size")
    p.add_argument("--intermediate", type=int, default=1376, help="MLP intermediate size")
    p.add_argument("--heads", type=int, default=8, help="attention heads (= key/value heads)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32, help="lora_alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per side of the train step")
    p.add_argument("--fwd-repeats", type=int, default=None,
                   help="timed repeats per side of each eval forward (default: 2 x --repeats; forwards are cheap)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per side before timing")
    p.add_argument("--apply-repeats", type=int, default=3, help="timed applies per side (after one cold one)")
    p.add_argument("--mem-warmup", type=int, default=2, help="train steps in the memory child before measuring")
    p.add_argument("--mem-steps", type=int, default=3, help="train steps measured in the memory child")
    p.add_argument("--mem-timeout", type=float, default=600)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--no-qlora", action="store_true", help="skip the QLoRA rows (4-bit NF4 base, tools/bench_qlora.py)")
    p.add_argument("--no-generate", action="store_true", help="skip the generate rows (tools/bench_generate.py)")
    p.add_argument("--switch-inner", type=int, default=50,
                   help="set_adapter round trips per timed sample (one takes a few milliseconds at most)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile section (the slow one)")
    p.add_argument("--compile-layers", type=int, default=2,
                   help="decoder layers of the (otherwise identical) model used for the torch.compile rows")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of both sides")
    p.add_argument("--compile-threads", type=int, default=1,
                   help="torch threads in the torch.compile section (see docs/benchmarks.md: why not all cores)")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats and the aot_eager compile backend, for a smoke test (about a minute); "
                        "flags given explicitly still win")
    p.add_argument("--json", metavar="PATH", help="also write the results (all samples) as JSON")
    args = p.parse_args(argv)
    if args.quick:
        explicit = {a.lstrip("-").replace("-", "_").split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, value)
    if args.fwd_repeats is None:
        args.fwd_repeats = 2 * args.repeats
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    return args


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import peft
    import peftfx
    import transformers

    torch.set_num_threads(args.threads)
    load_start = _loadavg()
    t_start = time.perf_counter()
    base = build_base(args)
    inputs = make_inputs(args)
    n_base = sum(p.numel() for p in base.parameters())
    log(f"Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {n_base / 1e6:.1f}M params; "
        f"batch {args.batch} x {args.seq}; {args.threads} threads")

    # -- apply ---------------------------------------------------------------------------------------
    log("apply (one cold call each, then timed repeats, interleaved)")
    models: dict[str, torch.nn.Module] = {}
    apply_samples: dict[str, list[float]] = {s: [] for s in SIDES}
    cold: dict[str, float] = {}
    for i in range(1 + args.apply_repeats):
        for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
            fresh = copy.deepcopy(base)
            gc.collect()
            t0 = time.perf_counter()
            models[side] = apply_side(side, fresh, args)
            dt = time.perf_counter() - t0
            if i == 0:
                cold[side] = dt
            else:
                apply_samples[side].append(dt)
    pm, pp = models["peftfx"], models["peft"]
    trainable = {s: sum(p.numel() for p in m.parameters() if p.requires_grad) for s, m in models.items()}

    # -- same function on both sides -------------------------------------------------------------------
    copy_peft_lora_into_peftfx(pm, pp, args.seed)
    # the same adapter with fusion off (passes/fuse.py not run): what fusion buys, in the same rounds
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
        unfused_diff = float((unfused(**inputs).logits - logits_fx).abs().max())
    max_diff = float((logits_fx - logits_pf).abs().max())
    adapter_effect = float((logits_pf - logits_base).abs().max())
    log(f"check: max |logits peftfx - PEFT| = {max_diff:.2e} (adapter moves logits by up to {adapter_effect:.2e})")

    # -- eager forward, eval, no_grad --------------------------------------------------------------
    log("eval forward (plain model, peftfx, PEFT; then both with the adapter disabled)")

    def fwd(m: torch.nn.Module) -> Callable[[], Any]:
        def run():
            with torch.no_grad():
                return m(**inputs)
        return run

    def fwd_disabled(m: torch.nn.Module) -> Callable[[], Any]:
        def run():
            with torch.no_grad(), m.disable_adapter():
                return m(**inputs)
        return run

    fw = interleaved({"base": fwd(base), "peftfx": fwd(pm), "peft": fwd(pp), "unfused": fwd(unfused)},
                     args.warmup, args.fwd_repeats)
    fw_off = interleaved({"peftfx": fwd_disabled(pm), "peft": fwd_disabled(pp)}, args.warmup, args.fwd_repeats)

    # -- train step ------------------------------------------------------------------------------------
    log("train step (first call each is cold: peftfx captures the train graph here)")
    steps = {s: make_train_step(m, inputs) for s, m in models.items()}
    first_step = {}
    for side in SIDES[::-1]:  # PEFT first, so peftfx's capture garbage cannot land in PEFT's cold step
        gc.collect()
        first_step[side] = timed(steps[side])
    steps["unfused"] = make_train_step(unfused, inputs)
    steps["floor"] = make_floor_step(base, inputs)
    tr = interleaved(steps, args.warmup, args.repeats)
    pm.eval()
    pp.eval()
    del steps, unfused

    # -- many adapters: set_adapter, merge + unmerge, merged forward, mixed batches -----------------------
    log(f"adding adapters {', '.join(ADAPTERS[1:])} (same config) on both sides")
    add_same_adapters(pm, pp, list(ADAPTERS[1:]), args)
    log("set_adapter default -> b -> default")
    sw = bench_switch(pm, pp, inputs, args)
    log("merge_adapter + unmerge_adapter, then eval forward with the adapter merged (plain model, peftfx, PEFT)")
    mg = bench_merge(pm, pp, base, inputs, args)
    log(f"mixed batch: adapter_names over {len(ADAPTERS)} adapters vs one active adapter")
    mx = bench_mixed(pm, pp, args)

    # -- torch.compile ---------------------------------------------------------------------------------
    cc = None
    if not args.no_compile:
        log(f"torch.compile ({args.compile_backend}), {args.compile_layers}-layer model: first call, then the "
            "first call after each switch (slow: compiles)")
        cc = bench_compile(args)

    # -- QLoRA ------------------------------------------------------------------------------------------
    ql = None
    if not args.no_qlora:
        log("QLoRA: the same Llama loaded in 4-bit NF4 (double quant) by transformers, LoRA on all linears")
        ql = qlora_section(args)

    # -- generate --------------------------------------------------------------------------------------
    gen = None
    if not args.no_generate:
        log("generate: greedy decoding, peftfx (static-cache decode graph, eager) vs PEFT's generate")
        from peftfx.tools.bench_generate import run as run_generate
        gen = run_generate(quick=args.quick, threads=args.threads, new=16 if args.quick else 32, repeats=3,
                           compile=not (args.quick or args.no_compile))

    # -- memory ------------------------------------------------------------------------------------------
    mem = None
    if not args.no_memory:
        log("peak memory: a fresh spawn child per side")
        mem = measure_memory(args)
    elapsed = time.perf_counter() - t_start
    load_end = _loadavg()

    # -- table -----------------------------------------------------------------------------------------
    base_med = statistics.median(fw["base"])
    rows = [
        {"metric": "trainable parameters", "unit": "count", "peftfx": trainable["peftfx"], "peft": trainable["peft"],
         "ratio": trainable["peftfx"] / trainable["peft"], "peftfx_text": f"{trainable['peftfx']:,}",
         "peft_text": f"{trainable['peft']:,}", "ratio_text": ratio(trainable["peftfx"], trainable["peft"])},
        {"metric": "apply, first call in process (cold)", "unit": "s", "peftfx": cold["peftfx"],
         "peft": cold["peft"], "ratio": cold["peftfx"] / cold["peft"], "peftfx_text": fmt_time(cold["peftfx"]),
         "peft_text": fmt_time(cold["peft"]), "ratio_text": ratio(cold["peftfx"], cold["peft"])},
        time_row(f"apply (median of {args.apply_repeats})", apply_samples["peftfx"], apply_samples["peft"]),
        {"metric": "eval forward, plain base model (reference)", "unit": "s", "peftfx": base_med, "peft": base_med,
         "ratio": 1.0, "peftfx_samples": fw["base"], "peftfx_iqr": quartiles(fw["base"]),
         "peftfx_text": fmt_time(base_med), "peft_text": "(same model)", "ratio_text": "-"},
        time_row("eval forward, adapter disabled", fw_off["peftfx"], fw_off["peft"]),
        time_row("eval forward, unmerged LoRA", fw["peftfx"], fw["peft"]),
    ]
    # each round of the 3-way interleave timed base, peftfx and PEFT back to back: pair within rounds
    rel = {s: round_ratio(fw[s], fw["base"]) for s in SIDES}
    rows.append({"metric": "  ... relative to plain base forward", "unit": "ratio", "peftfx": rel["peftfx"],
                 "peft": rel["peft"], "ratio": None,
                 "peftfx_text": f"{rel['peftfx']:.2f}x", "peft_text": f"{rel['peft']:.2f}x", "ratio_text": ""})
    rows.append({"metric": "train step, first call (cold)", "unit": "s", "peftfx": first_step["peftfx"],
                 "peft": first_step["peft"], "ratio": first_step["peftfx"] / first_step["peft"],
                 "peftfx_text": fmt_time(first_step["peftfx"]), "peft_text": fmt_time(first_step["peft"]),
                 "ratio_text": ratio(first_step["peftfx"], first_step["peft"])})
    rows.append(time_row("  eval forward, unmerged, fusion off (pm.fusion = False)", fw["unfused"], fw["peft"]))
    rows.append(time_row("train step (fwd+bwd+AdamW)", tr["peftfx"], tr["peft"]))
    rows.append(time_row("  train step, fusion off", tr["unfused"], tr["peft"]))
    floor = statistics.median(tr["floor"])
    rows.append({"metric": "  floor: frozen base fwd+bwd, no adapter (same rounds)", "unit": "s", "peftfx": floor,
                 "peft": floor, "ratio": None, "peftfx_samples": tr["floor"], "peftfx_iqr": quartiles(tr["floor"]),
                 "peftfx_text": fmt_time(floor), "peft_text": "(same model)", "ratio_text": "-"})
    over = {s: statistics.median(tr[s]) - floor for s in SIDES}
    rows.append({"metric": "  train step above the floor (the adapters' cost)", "unit": "s", "peftfx": over["peftfx"],
                 "peft": over["peft"], "ratio": over["peftfx"] / over["peft"], "peftfx_text": fmt_time(over["peftfx"]),
                 "peft_text": fmt_time(over["peft"]), "ratio_text": ratio(over["peftfx"], over["peft"])})
    rows += state_rows(sw, mg, mx, args)
    if cc is not None:
        rows += compile_rows(cc)
    if ql is not None:
        rows += qlora_table_rows(ql)
    if gen is not None:
        rows += generate_rows(gen)
    if mem is not None:
        def mem_row(metric: str, key: str) -> dict[str, Any]:
            vals = {s: mem[s].get(key) for s in SIDES}
            texts = {s: (fmt_bytes(vals[s]) if "error" not in mem[s] else "error") for s in SIDES}
            return {"metric": metric, "unit": "bytes", "peftfx": vals["peftfx"], "peft": vals["peft"],
                    "ratio": (vals["peftfx"] / vals["peft"]) if vals["peftfx"] and vals["peft"] else None,
                    "peftfx_text": texts["peftfx"], "peft_text": texts["peft"],
                    "ratio_text": ratio(vals["peftfx"], vals["peft"])}
        rows.append(mem_row("peak RSS, whole child (build+apply+all steps)", "peak_total"))
        rows.append(mem_row("peak RSS, steady-state train steps", "peak_steady"))
        rows.append(mem_row("  (RSS after building the base model)", "rss_after_build"))

    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "peftfx": peftfx.__version__, "threads": args.threads, "cpus": default_threads(),
           "machine": platform.machine(), "processor": _cpu_name(),
           "loadavg_start": load_start, "loadavg_end": load_end}
    table = render_table(rows)
    print()
    print(f"peftfx vs HF PEFT -- LoRA r={args.r} alpha={args.alpha:g} dropout={args.dropout:g} on "
          f"{len(TARGETS)} linear targets ({', '.join(TARGETS)})")
    print(f"model: LlamaForCausalLM (random init, fp32, CPU) layers={args.layers} hidden={args.hidden} "
          f"intermediate={args.intermediate} heads={args.heads} vocab={args.vocab} "
          f"({n_base / 1e6:.1f}M params); input batch {args.batch} x {args.seq} tokens")
    print(f"env: {env['date']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
          f"peftfx {env['peftfx']}, {args.threads} threads / {env['cpus']} CPUs ({env['processor']})")
    print(f"timing: medians of interleaved repeats after {args.warmup} warm-up calls per side: "
          f"{args.fwd_repeats} per eval forward, {args.repeats} per train step, "
          f"{args.apply_repeats} per apply (after 1 cold apply)")
    if mem is not None:
        print(f"memory: peak RSS (VmHWM) of a fresh spawn child per side; 'steady' = peak over {args.mem_steps} "
              f"train steps after {args.mem_warmup} warm-up steps, with the peak counter reset between")
        for side in SIDES:
            if "error" in mem[side]:
                print(f"  memory child {side} failed: {mem[side]['error']}")
    print(RATIO_NOTE)
    print(f"check: max |logits peftfx - PEFT| = {max_diff:.2e} with identical non-zero LoRA weights "
          f"(the adapter moves logits by up to {adapter_effect:.2e})")
    checks = sanity_checks(max_diff, adapter_effect, unfused_diff, sw, mg, mx, cc, ql)
    for name, c in checks["items"].items():
        print(f"check {'ok  ' if c['ok'] else 'FAIL'} {name}: {c['value']:.2e} (limit {c['limit']:.0e})"
              if isinstance(c["value"], float) else f"check {'ok  ' if c['ok'] else 'FAIL'} {name}: {c['value']}")
    goals = goal_lines(sw, mg, mx, cc, fw, tr, gen)
    print()
    print(table)
    print()
    print("goals (issues #3, #7 and #8):")
    for g in goals:
        print(f"  [{'met' if g['met'] else 'MISSED'}] {g['text']}")
    print()
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
    print(f"total wall time {elapsed:.0f} s; load average (1/5/15 min) at start {_fmt_load(load_start)}, "
          f"at end {_fmt_load(load_end)} (this benchmark itself adds about {args.threads} at the end)")

    result = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "env": env,
              "check": {"max_abs_logit_diff": max_diff, "adapter_max_abs_logit_effect": adapter_effect,
                        "passed": checks["passed"], "items": checks["items"]},
              "goals": goals,
              "sections": {"switch": sw, "merge": mg, "mixed": mx, "compile": cc},
              "rows": [{k: v for k, v in r.items() if not k.endswith("_text")} for r in rows],
              "memory": mem, "table": table, "wall_s": elapsed}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        log(f"wrote {args.json}")
    return result


def _loadavg() -> Optional[tuple[float, float, float]]:
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


if __name__ == "__main__":
    main()
