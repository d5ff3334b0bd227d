"""`peftfx demo`: LoRA on a tiny built-in Llama (CPU, no downloads); the steps are in peftfx.tools.demo.

peftfx demo [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

from .common import add_command


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(commands: "argparse._SubParsersAction") -> None:
    from ..demo import ARTIFACT_FILE, DEFAULT_OUT, DEFAULT_STEPS, GRAPH_FILE

    demo = add_command(
        commands,
        "demo",
        summary="LoRA on a tiny built-in Llama (CPU, no downloads): train, save, reload, draw, export, merge",
        description="Build a tiny Llama from a config, apply LoRA to q_proj/v_proj, train a few steps, save the "
        "adapter, reload it on a fresh copy of the base model and check the logits, draw the rewritten graph, "
        "export it as a .pt2 artifact and check that, then merge the adapter and unload the model. Runs on "
        "CPU in well under a minute; nothing is downloaded."
        "\n\n"
        "Writes into DIR: adapter_config.json and adapter_model.safetensors (the adapter, in PEFT's format; "
        f"they link into the hidden save store .peftfx/), {GRAPH_FILE} (the rewritten graph's code), graph.svg "
        "and graph.html (drawings of the graph; graph.dot instead when graphviz is not installed), "
        f"{ARTIFACT_FILE} (a torch.export artifact that runs without peftfx) and merged/ (the merged model, "
        "saved with transformers). The last lines say what to open next.",
        examples=["peftfx demo", f"peftfx demo --steps 10 --out /tmp/{DEFAULT_OUT}"],
    )
    demo.add_argument(
        "--steps", type=_positive_int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})"
    )
    demo.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"folder for everything the demo writes (default ./{DEFAULT_OUT})",
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
