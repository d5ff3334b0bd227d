"""The `peftfx` command line.

    peftfx demo [--steps N] [--out DIR]   LoRA on a tiny built-in Llama: train, save, reload, show the graph
    peftfx viz MODEL (--adapter DIR | --config JSON) -o FILE [--random-init] [--diff] [--depth N]
                                          draw the adapted graph (.svg .png .pdf .dot .html)
    peftfx export MODEL --adapter DIR -o FILE.pt2 [--unmerged] [--aoti] [--random-init]
                                          write a .pt2 artifact that runs without peftfx
    peftfx version                        versions of peftfx, torch and transformers

Also runs as `python -m peftfx.tools.cli ...`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEFAULT_OUT, DEFAULT_STEPS

    parser = argparse.ArgumentParser(
        prog="peftfx", description="peftfx: parameter-efficient fine-tuning as graph rewriting over torch.fx.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", help="LoRA on a tiny built-in Llama (CPU, no downloads): train, save, reload, show the graph",
        description="Build a tiny Llama, apply LoRA to q_proj/v_proj, train a few steps, save the adapter, "
                    "reload it on a fresh base model, check the logits and write the graph's code to DIR/graph.py.")
    demo.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                      help=f"training steps (default {DEFAULT_STEPS})")
    demo.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                      help=f"folder for the adapter and graph.py (default ./{DEFAULT_OUT})")
    demo.set_defaults(func=_demo)

    from .viz_cli import add_parser as add_viz_parser
    add_viz_parser(commands)
    from .export_cli import add_parser as add_export_parser
    add_export_parser(commands)

    version = commands.add_parser("version", help="print the versions of peftfx, torch and transformers")
    version.set_defaults(func=_version)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from peftfx.errors import PeftFxError

    from .demo import DemoError, run_demo

    try:
        run_demo(steps=args.steps, out=args.out)
    except (DemoError, PeftFxError) as exc:
        print(f"peftfx demo: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


def _version(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import peftfx

    print(f"peftfx {peftfx.__version__} (torch {torch.__version__}, transformers {transformers.__version__})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `peftfx` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
