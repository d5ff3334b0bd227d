"""`peftfx version`: the versions of peftfx, torch and transformers, for bug reports."""

from __future__ import annotations

import argparse

from .common import add_command


def add_parser(commands: "argparse._SubParsersAction") -> None:
    version = add_command(
        commands,
        "version",
        summary="print the versions of peftfx, torch and transformers",
        description="Print the versions of peftfx, torch and transformers (for bug reports).",
        examples=["peftfx version"],
    )
    version.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import peftfx

    print(f"peftfx {peftfx.__version__} (torch {torch.__version__}, transformers {transformers.__version__})")
    return 0
