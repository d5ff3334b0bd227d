"""`peftfx viz`: draw a model's adapted graph from the command line.

    peftfx viz path/to/model --adapter path/to/adapter -o graph.svg
    peftfx viz config.json --random-init --config lora.json -o graph.html --diff
    peftfx viz path/to/model --config '{"peft_type": "LORA", "target_modules": ["q_proj"]}' -o g.png --depth 3

MODEL is a transformers model folder, or (with --random-init) a config.json file or a folder holding
one: the model is then built with random weights, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from peftfx.errors import ConfigError, PeftFxError

if TYPE_CHECKING:
    import torch

    from peftfx.config import AdapterConfig


def add_parser(commands: "argparse._SubParsersAction") -> None:
    viz = commands.add_parser(
        "viz",
        help="draw the adapted graph (.svg .png .pdf .dot .html)",
        description="Capture a model, add an adapter and draw where it went. The output format follows the "
        "file extension: .svg, .png, .pdf, .dot or .html (self-contained page with search).",
    )
    viz.add_argument("model", metavar="MODEL", help="model folder, or with --random-init a config.json (or its folder)")
    viz.add_argument(
        "--random-init",
        action="store_true",
        help="build the model from its config with random weights (no weights needed)",
    )
    source = viz.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", metavar="DIR", help="a saved adapter folder (peftfx or HF PEFT format)")
    source.add_argument(
        "--config",
        metavar="JSON",
        help="an adapter config: a JSON file (adapter_config.json format) or an inline JSON object",
    )
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


def load_model(model: str, random_init: bool) -> "torch.nn.Module":
    """A transformers model from a folder, or from a config with random weights (seeded, eval mode)."""
    import torch
    import transformers

    if random_init:
        if not os.path.exists(model):
            raise ConfigError(f"{model!r} does not exist; give a config.json file or a folder holding one.")
        config = transformers.AutoConfig.from_pretrained(model)
        cls = _model_class(config)
        torch.manual_seed(0)
        return (cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)).eval()
    if not os.path.isdir(model):
        raise ConfigError(
            f"{model!r} is not a model folder; pass a folder saved by save_pretrained, or a "
            "config.json together with --random-init."
        )
    config = transformers.AutoConfig.from_pretrained(model)
    return _model_class(config).from_pretrained(model).eval()


def _model_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def read_adapter_config(text: str) -> "AdapterConfig":
    from peftfx.config import config_from_dict

    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config is not valid JSON: {exc}") from exc
        return config_from_dict(data, source="--config")
    if not os.path.isfile(text):
        raise ConfigError(f"--config {text!r}: no such file; give an adapter_config.json path or inline JSON.")
    with open(text, encoding="utf-8") as f:
        return config_from_dict(json.load(f), source=text)


def run(args: argparse.Namespace) -> int:
    import peftfx

    from ..viz import visualize

    try:
        model = load_model(args.model, args.random_init)
        pm = peftfx.load(model, args.adapter) if args.adapter else peftfx.apply(model, read_adapter_config(args.config))
        path = visualize(pm, args.output, depth=args.depth, diff=args.diff, fold=not args.no_fold, details=args.details)
    except (PeftFxError, OSError) as exc:
        print(f"peftfx viz: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
