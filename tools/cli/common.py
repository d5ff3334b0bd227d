"""What the `peftfx` subcommands share: help with examples, and the MODEL + adapter arguments of
`viz` and `export` (a model folder or a config with random weights; a saved adapter or a config)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import textwrap
from typing import TYPE_CHECKING, Sequence

from peftfx.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from peftfx.config import AdapterConfig
    from peftfx.model import PeftFxModel

MAX_WIDTH = 100  # help text is wrapped to the terminal, at most this wide (example lines kept as written)


def add_command(
    commands: "argparse._SubParsersAction",
    name: str,
    *,
    summary: str,
    description: str,
    examples: Sequence[str],
) -> argparse.ArgumentParser:
    """A subparser whose help shows `description` (paragraphs separated by blank lines) and an
    "examples:" epilog with one command line per entry of `examples`."""
    width = max(40, min(MAX_WIDTH, shutil.get_terminal_size().columns - 2))  # as argparse wraps the options
    paragraphs = [textwrap.fill(" ".join(p.split()), width) for p in description.split("\n\n")]
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return commands.add_parser(
        name,
        help=summary,
        description="\n\n".join(paragraphs),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --random-init, and one of --adapter / --config."""
    parser.add_argument(
        "model", metavar="MODEL", help="model folder, or with --random-init a config.json (or its folder)"
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="build the model from its config with random weights (no weights needed)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", metavar="DIR", help="a saved adapter folder (peftfx or HF PEFT format)")
    source.add_argument(
        "--config",
        metavar="JSON",
        help="a new adapter from a config: a JSON file (adapter_config.json format) or an inline JSON object",
    )


def adapted_model(args: argparse.Namespace) -> "PeftFxModel":
    """The model of `args.model` with the adapter of `args.adapter` loaded, or that of `args.config` added.
    The config is read first, so a bad one fails before the model is loaded."""
    import peftfx

    config = read_adapter_config(args.config) if args.config is not None else None
    model = load_model(args.model, args.random_init)
    return peftfx.apply(model, config) if config is not None else peftfx.load(model, args.adapter)


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
    """An adapter config from --config: inline JSON, or the path of a JSON file."""
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
