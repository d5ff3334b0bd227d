"""The benchmark's command line: sizes, repeats, which sections to skip, and `--quick` for a smoke test."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .models import default_threads

DESCRIPTION = "Side-by-side benchmark: peftfx vs HF PEFT, LoRA on a randomly initialised Llama, CPU, fp32."

QUICK = dict(
    compile_layers=1,
    compile_backend="aot_eager",
    switch_inner=10,
    layers=1,
    hidden=64,
    intermediate=172,
    heads=4,
    vocab=512,
    batch=2,
    seq=16,
    repeats=3,
    fwd_repeats=3,
    warmup=1,
    apply_repeats=1,
    mem_warmup=1,
    mem_steps=1,
    startup_layers=[1, 2],
    startup_compile_layers=[1, 2],
    startup_repeats=1,
    long_seq=256,
)


def layer_list(text: str) -> list[int]:
    """Parse "4,32" into [4, 32]: the layer counts of the start-up rows."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer counts") from None
    if not layers or min(layers) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more layer counts >= 1")
    return layers


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m peftfx.tools.bench",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    p.add_argument(
        "--fwd-repeats",
        type=int,
        default=None,
        help="timed repeats per side of each eval forward (default: 2 x --repeats; forwards are cheap)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per side before timing")
    p.add_argument("--apply-repeats", type=int, default=3, help="timed applies per side (after one cold one)")
    p.add_argument("--mem-warmup", type=int, default=2, help="train steps in the memory child before measuring")
    p.add_argument("--mem-steps", type=int, default=3, help="train steps measured in the memory child")
    p.add_argument("--mem-timeout", type=float, default=600)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--no-qlora", action="store_true", help="skip the QLoRA rows (4-bit NF4 base, tools/bench/qlora.py)")
    p.add_argument("--no-generate", action="store_true", help="skip the generate rows (tools/bench/generate.py)")
    p.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="skip the activation-checkpointing rows (tools/bench/checkpointing.py)",
    )
    p.add_argument("--no-startup", action="store_true", help="skip the start-up rows (tools/bench/startup.py)")
    p.add_argument(
        "--startup-layers",
        type=layer_list,
        default=[4, 32],
        help="decoder layers of the tiny Llamas whose start-up (apply + first forward + first train step) is timed",
    )
    p.add_argument(
        "--startup-threads",
        type=int,
        default=1,
        help="torch threads while start-up is timed (see tools/bench/startup.py: why not all cores)",
    )
    p.add_argument(
        "--startup-repeats", type=int, default=3, help="start-up rounds per layer count (a fresh model each)"
    )
    p.add_argument(
        "--no-startup-compile",
        action="store_true",
        help="skip the start-up rows of pm.compile() vs torch.compile (slow: compiles from scratch)",
    )
    p.add_argument(
        "--startup-compile-layers",
        type=layer_list,
        default=[2, 8],
        help="decoder layers of the tiny Llamas whose compile + first train step is timed",
    )
    p.add_argument(
        "--long-seq",
        type=int,
        default=2048,
        help="tokens of the start-up section's long-sequence train step (batch 1, with and without GC)",
    )
    p.add_argument(
        "--switch-inner",
        type=int,
        default=50,
        help="set_adapter round trips per timed sample (one takes a few milliseconds at most)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile section (the slow one)")
    p.add_argument(
        "--compile-layers",
        type=int,
        default=2,
        help="decoder layers of the (otherwise identical) model used for the torch.compile rows",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of both sides")
    p.add_argument(
        "--compile-threads",
        type=int,
        default=1,
        help="torch threads in the torch.compile section (see docs/benchmarks.md: why not all cores)",
    )
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, few repeats and the aot_eager compile backend, for a smoke test (about a minute); "
        "flags given explicitly still win",
    )
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
