"""The `peftfx` command line: the parser wiring; each command lives in its own module here.

    peftfx demo [--steps N] [--out DIR]   LoRA on a tiny built-in Llama: train, save, reload, draw, export, merge
    peftfx viz MODEL (--adapter DIR | --config JSON) -o FILE [--random-init] [--diff] [--depth N]
                                          draw the adapted graph (.svg .png .pdf .dot .html)
    peftfx export MODEL (--adapter DIR | --config JSON) -o FILE.pt2 [--unmerged] [--aoti] [--random-init]
                                          write a .pt2 artifact that runs without peftfx
    peftfx version                        versions of peftfx, torch and transformers

Also runs as `python -m peftfx.tools.cli ...`. A command module has `add_parser(commands)`, which adds
its subparser (with `common.add_command`, so its help ends with example command lines) and sets `func`
to the function that runs it (returning the exit code). Progress (peftfx's INFO log records) goes to
stderr while a command runs; results are printed on stdout.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from peftfx.progress import log_to_stderr

from . import demo, export, version, viz

COMMANDS = (demo, viz, export, version)  # in the order `peftfx --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftfx",
        description="peftfx: parameter-efficient fine-tuning as graph rewriting over torch.fx.",
        epilog="examples:\n"
        "  peftfx demo\n"
        "  peftfx viz path/to/model --adapter path/to/adapter -o graph.html\n"
        "  peftfx export path/to/model --adapter path/to/adapter -o model.pt2\n\n"
        "`peftfx COMMAND --help` shows each command's options and more examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `peftfx` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    with log_to_stderr():
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
