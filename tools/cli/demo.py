"""`peftfx demo`: LoRA on a tiny built-in Llama (CPU, no downloads); the steps are in peftfx.tools.demo.

peftfx demo [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(commands: "argparse._SubParsersAction") -> None:
    from ..demo import DEFAULT_OUT, DEFAULT_STEPS

    demo = commands.add_parser(
        "demo",
        help="LoRA on a tiny built-in Llama (CPU, no downloads): train, save, reload, show the graph",
        description="Build a tiny Llama, apply LoRA to q_proj/v_proj, train a few steps, save the adapter, "
        "reload it on a fresh base model, check the logits and write the graph's code to DIR/graph.py.",
    )
    demo.add_argument(
        "--steps", type=_positive_int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})"
    )
    demo.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder for the adapter and graph.py (default ./{DEFAULT_OUT})",
    )
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peftfx.errors import PeftFxError  # DemoError is one

    from ..demo import run_demo

    try:
        run_demo(steps=args.steps, out=args.out)
    except PeftFxError as exc:
        print(f"peftfx demo: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0
