"""Regenerate the pictures in docs/visualizer.md: `python -m peftfx.tools.viz.docs [OUT_DIR]`.

Tiny random Llamas (3 layers, CPU, nothing downloaded) with LoRA on q/v, prefix tuning, QLoRA, a diff
and a collapsed overview, drawn by `peftfx.visualize`, plus a screenshot of the HTML page searching for
a module when headless Chromium is installed. PNGs are palette-compressed with `pngquant` when it is
installed, so they stay small enough to commit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

DPI = 50


def tiny_llama(layers: int = 3):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def shrink(path: str) -> None:
    """Palette-quantize a PNG in place when pngquant is available (about 5x smaller)."""
    if shutil.which("pngquant"):
        subprocess.run(["pngquant", "--quality=60-90", "--speed", "1", "--force", "--output", path, path], check=True)


def screenshot(page: str, out: str, query: str) -> Optional[str]:
    names = ("chromium", "chromium-browser", "google-chrome")
    browser = next((shutil.which(b) for b in names if shutil.which(b)), None)
    if browser is None:
        return None
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--window-size=1280,760",
                "--virtual-time-budget=3000",
                f"--screenshot={out}",
                f"file://{os.path.abspath(page)}#search={query}",
            ],
            check=True,
            capture_output=True,
        )
    return out


def main(out: str = "docs/img") -> list[str]:
    import peftfx

    os.makedirs(out, exist_ok=True)
    written = []

    def draw(pm, name: str, **options) -> str:
        path = peftfx.visualize(pm, os.path.join(out, name), dpi=DPI, **options)
        shrink(path)
        written.append(path)
        return path

    lora = peftfx.apply(tiny_llama(), peftfx.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    draw(lora, "viz-lora.png", title="tiny Llama, LoRA on q_proj and v_proj")
    draw(lora, "viz-lora-diff.png", diff=True, title="tiny Llama, LoRA on q_proj and v_proj: diff against the base")
    draw(lora, "viz-lora-depth3.png", depth=3, title="tiny Llama, LoRA, depth=3")
    prefix = peftfx.apply(tiny_llama(), peftfx.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    draw(prefix, "viz-prefix.png", title="tiny Llama, prefix tuning (4 virtual tokens)")
    quant = getattr(peftfx, "QuantConfig", None)
    if quant is not None:
        try:
            qlora = peftfx.apply(
                tiny_llama(),
                peftfx.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                quantization=quant(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            )
        except peftfx.PeftFxError as exc:  # bitsandbytes missing
            print(f"skipping QLoRA: {exc}", file=sys.stderr)
        else:
            draw(qlora, "viz-qlora.png", title="tiny Llama, QLoRA (NF4 base, LoRA on q_proj and v_proj)")
    with tempfile.TemporaryDirectory() as tmp:
        page = peftfx.visualize(lora, os.path.join(tmp, "graph.html"), title="tiny Llama, LoRA on q_proj and v_proj")
        shot = screenshot(page, os.path.join(out, "viz-html.png"), "layers.0.self_attn.q_proj")
        if shot:
            shrink(shot)
            written.append(shot)
    return written


if __name__ == "__main__":
    for path in main(*sys.argv[1:]):
        print(f"{os.path.getsize(path):>8,d}  {path}")
