"""Generation tokens/s: pm.generate (transformers' generate loop over peftfx's static-cache decode graph) vs
HF PEFT's generate, LoRA on a random Llama, CPU.

Run from the repository root:

    python -m peftfx.tools.bench.generate                  # default sizes
    python -m peftfx.tools.bench.generate --quick          # a smaller model, fewer tokens
    python -m peftfx.tools.bench.generate --json out.json  # also write the numbers as JSON

Both sides wrap deep copies of one base model with the same LoRA weights (PEFT's, moved over by
checkpoint). Each case is greedy decoding of `--new` tokens from a left-padded batch; timings are medians
of interleaved repeats (peftfx, PEFT, ...) after a warm-up call (which for peftfx includes the one-time
decode-graph capture, reported separately). Every case first checks that both sides emit the same tokens.
tokens/s counts generated tokens of all rows. `run_section` and `table_rows` are the generate rows of
`python -m peftfx.tools.bench`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

import peftfx

from .report import log


def _model(quick: bool):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=1000 if quick else 4000,
        hidden_size=128 if quick else 256,
        intermediate_size=256 if quick else 688,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _twins(base, targets):
    import peft

    ref = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    )
    folder = tempfile.mkdtemp()
    ref.save_pretrained(folder)
    return ref.eval(), peftfx.load(copy.deepcopy(base), folder).eval(), folder


def _prompts(batch: int, length: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : row * length // (2 * batch)] = 0  # left padding of different lengths
    return {"input_ids": ids, "attention_mask": mask}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(quick: bool, threads: int, new: int, repeats: int, compile: bool = False) -> dict:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    base = _model(quick)
    vocab = base.config.vocab_size
    results: dict[str, Any] = {
        "threads": threads,
        "new_tokens": new,
        "torch": torch.__version__,
        "model": {k: getattr(base.config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "cases": [],
    }
    for targets in (["q_proj", "v_proj"], "all-linear"):
        ref, pm, folder = _twins(base, targets)
        start = time.perf_counter()
        pm.generate(**_prompts(1, 8, vocab), max_new_tokens=2)
        results.setdefault("capture_s", round(time.perf_counter() - start, 3))
        compiled = None
        if compile:
            compiled = peftfx.load(copy.deepcopy(base), folder).eval().compile()
        for batch, length in ((1, 32), (4, 32)):
            prompts = _prompts(batch, length, vocab)
            with torch.no_grad():
                sides = {
                    "peftfx": lambda: pm.generate(**prompts, max_new_tokens=new),
                    "peft": lambda: ref.generate(**prompts, max_new_tokens=new, do_sample=False),
                }
                if compiled is not None:
                    sides["compiled"] = lambda: compiled.generate(**prompts, max_new_tokens=new)
                start = time.perf_counter()
                outs = {side: fn() for side, fn in sides.items()}  # warm-up, and the tokens must agree
                warmup = time.perf_counter() - start
                same = all(torch.equal(out, outs["peft"]) for out in outs.values())
                samples: dict[str, list[float]] = {side: [] for side in sides}
                for _ in range(repeats):
                    for side, fn in sides.items():
                        samples[side].append(_time(fn))
            tps = {side: batch * new / statistics.median(s) for side, s in samples.items()}
            case = {
                "targets": targets if isinstance(targets, str) else "+".join(targets),
                "batch": batch,
                "prompt": length,
                "same_tokens": same,
                "peftfx_tok_s": round(tps["peftfx"], 1),
                "peft_tok_s": round(tps["peft"], 1),
                "speedup": round(tps["peftfx"] / tps["peft"], 2),
            }
            line = (
                f"{case['targets']:>14}  batch {batch}  prompt {length}  new {new}:  "
                f"peftfx {case['peftfx_tok_s']:8.1f} tok/s   PEFT {case['peft_tok_s']:8.1f} tok/s   "
                f"x{case['speedup']:.2f}"
            )
            if compiled is not None:
                case.update(
                    compiled_tok_s=round(tps["compiled"], 1),
                    compiled_speedup=round(tps["compiled"] / tps["peft"], 2),
                    warmup_with_compile_s=round(warmup, 1),
                )
                line += (
                    f"   compiled {case['compiled_tok_s']:8.1f} tok/s x{case['compiled_speedup']:.2f} "
                    f"(warm-up incl. compile {case['warmup_with_compile_s']} s)"
                )
            results["cases"].append(case)
            print(line + f"   same tokens: {same}", flush=True)
    print(f"one-time decode-graph capture (incl. first tiny generate): {results['capture_s']} s")
    return results


def run_section(bench: Any) -> dict:
    """`run` with the main benchmark's threads; fewer tokens with --quick, no compiled rows with --quick or
    --no-compile."""
    args = bench.args
    log("generate: greedy decoding, peftfx (transformers' generate over the static-cache decode graph) vs PEFT's")
    return run(
        quick=args.quick,
        threads=args.threads,
        new=16 if args.quick else 32,
        repeats=3,
        compile=not (args.quick or args.no_compile),
    )


def table_rows(gen: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """tokens/s per case (higher is better, so the ratio column is peftfx / PEFT throughput)."""

    def row(metric: str, fx: float, pf: float) -> dict[str, Any]:
        return {
            "metric": metric,
            "unit": "tok/s",
            "peftfx": fx,
            "peft": pf,
            "ratio": fx / pf,
            "peftfx_text": f"{fx:.0f}",
            "peft_text": f"{pf:.0f}",
            "ratio_text": f"{fx / pf:.2f}x",
        }

    rows = []
    for case in gen["cases"]:
        same = "" if case["same_tokens"] else " (TOKENS DIFFER)"
        rows.append(
            row(
                f"generate tok/s, {case['targets']}, batch {case['batch']} (x = peftfx/PEFT){same}",
                case["peftfx_tok_s"],
                case["peft_tok_s"],
            )
        )
        if "compiled_tok_s" in case:
            rows.append(
                row(
                    f"  ... peftfx after pm.compile() (warm-up incl. compile {case['warmup_with_compile_s']} s)",
                    case["compiled_tok_s"],
                    case["peft_tok_s"],
                )
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--new", type=int, default=None, help="new tokens per call (default 64, quick 16)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time pm.compile()'d generation (inductor; compiles per batch size, slow)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    new = args.new or (16 if args.quick else 64)
    results = run(args.quick, args.threads, new, args.repeats, args.compile)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
