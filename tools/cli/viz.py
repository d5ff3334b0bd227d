"""`peftfx viz`: draw a model's adapted graph from the command line.

    peftfx viz path/to/model --adapter path/to/adapter -o graph.svg
    peftfx viz config.json --random-init --config lora.json -o graph.html --diff
    peftfx viz path/to/model --config '{"peft_type": "LORA", "target_modules": ["q_proj"]}' -o g.png --depth 3

MODEL is a transformers model folder, or (with --random-init) a config.json file or a folder holding
one: the model is then built with random weights, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys

from peftfx.errors import PeftFxError

from .common import adapted_model, add_command, add_model_arguments, load_model, read_adapter_config

__all__ = ["add_parser", "run", "load_model", "read_adapter_config"]


def add_parser(commands: "argparse._SubParsersAction") -> None:
    viz = add_command(
        commands,
        "viz",
        summary="draw the adapted graph (.svg .png .pdf .dot .html)",
        description="Capture a model, add an adapter and draw where it went. The output format follows the "
        "file extension: .svg, .png, .pdf, .dot or .html (a self-contained page with search).",
        examples=[
            "peftfx viz path/to/model --adapter path/to/adapter -o graph.svg",
            "peftfx viz config.json --random-init --config adapter_config.json -o graph.html --diff",
            'peftfx viz path/to/model --config \'{"peft_type": "LORA", "target_modules": ["q_proj"]}\' '
            "-o graph.png --depth 3",
        ],
    )
    add_model_arguments(viz)
    viz.add_argument("-o", "--output", required=True, metavar="FILE", help="output file; its extension sets the format")
    viz.add_argument(
        "--diff", action="store_true", help="colour nodes added / removed / rewired against the base graph"
    )
    viz.add_argument(
        "--depth",
        type=int,
        default=None,
        metavar="N",
        help="draw each module N path components deep as one box (e.g. 3 = model.layers.<i>)",
    )
    viz.add_argument("--no-fold", action="store_true", help="draw every repeated block instead of folding them")
    viz.add_argument(
        "--details", action="store_true", help="also draw base parameter reads and shape queries (sym_size)"
    )
    viz.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..viz import output_format, visualize

    try:
        output_format(args.output)  # a format it cannot write fails before the model is loaded
        pm = adapted_model(args)
        path = visualize(pm, args.output, depth=args.depth, diff=args.diff, fold=not args.no_fold, details=args.details)
    except (PeftFxError, OSError) as exc:
        print(f"peftfx viz: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
