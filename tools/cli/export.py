"""`peftfx export`: write a model with its adapter as a .pt2 artifact that runs without peftfx.

    peftfx export path/to/model --adapter path/to/adapter -o model.pt2            # merged ExportedProgram
    peftfx export path/to/model --adapter path/to/adapter -o model.pt2 --unmerged # adapters kept separate
    peftfx export path/to/model --adapter path/to/adapter -o model.pt2 --aoti     # AOTInductor package

MODEL is a transformers model folder (or, with --random-init, a config.json). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from peftfx.errors import PeftFxError


def add_parser(commands: "argparse._SubParsersAction") -> None:
    export = commands.add_parser(
        "export",
        help="write the model with its adapter as a .pt2 artifact (torch.export or AOTInductor)",
        description="Load a model and an adapter, and write a .pt2 artifact that torch.export.load (or, with "
        "--aoti, torch._inductor.aoti_load_package) runs without peftfx. Batch and sequence "
        "length stay dynamic.",
    )
    export.add_argument(
        "model", metavar="MODEL", help="model folder, or with --random-init a config.json (or its folder)"
    )
    export.add_argument(
        "--random-init", action="store_true", help="build the model from its config with random weights"
    )
    export.add_argument(
        "--adapter", required=True, metavar="DIR", help="a saved adapter folder (peftfx or HF PEFT format)"
    )
    export.add_argument("-o", "--output", required=True, metavar="FILE.pt2", help="the artifact to write")
    export.add_argument(
        "--unmerged",
        action="store_true",
        help="keep the adapter separate (its tensors are the artifact's parameters; weight files "
        "for it are written to FILE.pt2.adapters/)",
    )
    export.add_argument("--aoti", action="store_true", help="compile ahead of time with AOTInductor (slow)")
    export.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import peftfx

    from ..export import export, print_progress
    from .viz import load_model

    start = time.perf_counter()
    try:
        print_progress(f"loading {args.model} and the adapter {args.adapter}")
        pm = peftfx.load(load_model(args.model, args.random_init), args.adapter)
        export(pm, args.output, merged=not args.unmerged, aoti=args.aoti, progress=print_progress)
    except (PeftFxError, OSError) as exc:
        print(f"peftfx export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    return 0
