"""Side-by-side benchmark: peftfx vs HF PEFT, LoRA on a randomly initialised Llama, CPU, fp32.

Run from the repository root:

    python -m tools.bench                 # default sizes (a few minutes on 2 cores)
    python -m tools.bench --quick         # tiny smoke test (well under a minute)
    python tools/bench.py --json out.json # same, and write every sample as JSON

Both sides run in one process on deep copies of the same base model (PEFT mutates the model it
wraps) with the same LoRA config. Timings are medians of interleaved repeats (peftfx, PEFT, peftfx,
PEFT, ...) after warm-up, measured with time.perf_counter. Peak memory is measured separately: each
side runs its train steps in a fresh `multiprocessing` spawn child, which reports its peak resident
set size (VmHWM from /proc/self/status, or ru_maxrss where that is missing).
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
    while len(results) < len(SIDES):
        try:
            got = queue.get(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            break
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


def copy_peft_lora_into_peftfx(pm: torch.nn.Module, pp: torch.nn.Module, seed: int) -> int:
    """Give PEFT's adapter non-zero B (so the adapter changes outputs), then copy every LoRA weight
    into peftfx's store. PEFT names: base_model.model.<site>.lora_X.default.weight; peftfx's store
    uses <site>.lora_X.default.weight."""
    g = torch.Generator().manual_seed(seed + 2)
    store = dict(pm.adapters.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in pp.named_parameters():
            if "lora_" not in name:
                continue
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            key = name[len("base_model.model."):]
            store[key].copy_(p)
            copied += 1
    if copied != len(store):
        raise RuntimeError(f"copied {copied} LoRA tensors from PEFT, peftfx has {len(store)}")
    return copied


# --------------------------------------------------------------------------------------------------
# reporting


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


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


def time_row(metric: str, fx: list[float], pf: list[float], unit: str = "s") -> dict[str, Any]:
    mfx, mpf = statistics.median(fx), statistics.median(pf)
    paired = statistics.median(a / b for a, b in zip(fx, pf))
    return {"metric": metric, "unit": unit, "peftfx": mfx, "peft": mpf, "ratio": paired,
            "ratio_of_medians": mfx / mpf, "paired_ratio": paired,
            "peftfx_samples": fx, "peft_samples": pf,
            "peftfx_iqr": quartiles(fx), "peft_iqr": quartiles(pf),
            "peftfx_text": fmt_time(mfx), "peft_text": fmt_time(mpf), "ratio_text": f"{paired:.2f}x"}


# --------------------------------------------------------------------------------------------------


RATIO_NOTE = ("ratios: for timed rows, the median over rounds of (peftfx time / PEFT time) within the same "
              "interleaved round (the '... relative to plain base' row likewise pairs with the base call of the "
              "same round); on a shared machine bursts of foreign load hit both sides of a round alike, so this "
              "is steadier than a ratio of medians (listed below the table). Cold rows: one sample each.")

QUICK = dict(layers=1, hidden=64, intermediate=172, heads=4, vocab=512, batch=2, seq=16, repeats=3, fwd_repeats=3,
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
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats, for a smoke test (< 60 s); flags given explicitly still win")
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
    pm.eval()
    pp.eval()
    with torch.no_grad():
        logits_fx = pm(**inputs).logits
        logits_pf = pp(**inputs).logits
        logits_base = base(**inputs).logits
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

    fw = interleaved({"base": fwd(base), "peftfx": fwd(pm), "peft": fwd(pp)}, args.warmup, args.fwd_repeats)
    fw_off = interleaved({"peftfx": fwd_disabled(pm), "peft": fwd_disabled(pp)}, args.warmup, args.fwd_repeats)

    # -- train step ------------------------------------------------------------------------------------
    log("train step (first call each is cold: peftfx captures the train graph here)")
    steps = {s: make_train_step(m, inputs) for s, m in models.items()}
    first_step = {}
    for side in SIDES[::-1]:  # PEFT first, so peftfx's capture garbage cannot land in PEFT's cold step
        gc.collect()
        first_step[side] = timed(steps[side])
    tr = interleaved(steps, args.warmup, args.repeats)
    pm.eval()
    pp.eval()

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
    rel = {s: statistics.median(a / b for a, b in zip(fw[s], fw["base"])) for s in SIDES}
    rows.append({"metric": "  ... relative to plain base forward", "unit": "ratio", "peftfx": rel["peftfx"],
                 "peft": rel["peft"], "ratio": None,
                 "peftfx_text": f"{rel['peftfx']:.2f}x", "peft_text": f"{rel['peft']:.2f}x", "ratio_text": ""})
    rows.append({"metric": "train step, first call (cold)", "unit": "s", "peftfx": first_step["peftfx"],
                 "peft": first_step["peft"], "ratio": first_step["peftfx"] / first_step["peft"],
                 "peftfx_text": fmt_time(first_step["peftfx"]), "peft_text": fmt_time(first_step["peft"]),
                 "ratio_text": ratio(first_step["peftfx"], first_step["peft"])})
    rows.append(time_row("train step (fwd+bwd+AdamW)", tr["peftfx"], tr["peft"]))
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
    print()
    print(table)
    print()
    print("spread of the timed rows: min [interquartile range] (peftfx | PEFT); ratio of the medians")

    def spread(side: str, r: dict[str, Any]) -> str:
        lo, hi = r[f"{side}_iqr"]
        return f"{fmt_time(min(r[f'{side}_samples']))} [{fmt_time(lo)} - {fmt_time(hi)}]"

    for r in rows:
        if "peftfx_iqr" in r:
            other = spread("peft", r) if "peft_iqr" in r else "(same model)"
            paired = f"  |  {r['ratio_of_medians']:.2f}x" if "ratio_of_medians" in r else ""
            print(f"  {r['metric'].strip():<44} {spread('peftfx', r)}  |  {other}{paired}")
    print(f"total wall time {elapsed:.0f} s; load average (1/5/15 min) at start {_fmt_load(load_start)}, "
          f"at end {_fmt_load(load_end)} (this benchmark itself adds about {args.threads} at the end)")

    result = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "env": env,
              "check": {"max_abs_logit_diff": max_diff, "adapter_max_abs_logit_effect": adapter_effect},
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
