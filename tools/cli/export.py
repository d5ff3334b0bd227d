"""`peftfx export`: write a model with its adapter as a .pt2 artifact that runs without peftfx.

    peftfx export path/to/model --adapter path/to/adapter -o model.pt2            # merged ExportedProgram
    peftfx export path/to/model --adapter path/to/adapter -o model.pt2 --unmerged # adapters kept separate
    peftfx export path/to/model --adapter path/to/adapter -o model.pt2 --aoti     # AOTInductor package
    peftfx export config.json --random-init --config lora.json -o model.pt2       # a new adapter

MODEL is a transformers model folder (or, with --random-init, a config.json). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from peftfx.errors import PeftFxError
from peftfx.progress import get_logger

from .common import adapted_model, add_command, add_model_arguments

log = get_logger("cli")


def add_parser(commands: "argparse._SubParsersAction") -> None:
    export = add_command(
        commands,
        "export",
        summary="write the model with its adapter as a .pt2 artifact (torch.export or AOTInductor)",
        description="Load a model and an adapter (a saved one with --adapter, or a new one from a config with "
        "--config), and write a .pt2 artifact that torch.export.load (or, with --aoti, "
        "torch._inductor.aoti_load_package) runs without peftfx. Batch and sequence length stay dynamic. "
        "A new LoRA adapter starts with B = 0 and so computes the base model, unless its config sets "
        '"init_lora_weights": false.',
        examples=[
            "peftfx export path/to/model --adapter path/to/adapter -o model.pt2",
            "peftfx export path/to/model --adapter path/to/adapter -o model.pt2 --unmerged",
            "peftfx export config.json --random-init --config adapter_config.json -o model.pt2 --aoti",
        ],
    )
    add_model_arguments(export)
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
    from ..export import check_path, export

    start = time.perf_counter()
    try:
        check_path(args.output)  # a path export cannot write fails before the model is loaded
        log.info("loading %s and %s", args.model, args.adapter or "a new adapter from --config")
        pm = adapted_model(args)
        export(pm, args.output, merged=not args.unmerged, aoti=args.aoti)
    except (PeftFxError, OSError) as exc:
        print(f"peftfx export: {exc}", file=sys.stderr)
        return 1
    size = os.path.getsize(args.output) / 2**20
    print(f"wrote {args.output} ({size:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return 0
