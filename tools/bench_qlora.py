"""QLoRA benchmark: peftfx vs HF PEFT on the same bitsandbytes-quantized Llama, CPU, in one run.

    python tools/bench_qlora.py            # default sizes (about a minute on 2 cores)
    python tools/bench_qlora.py --quick    # smoke test
    python tools/bench_qlora.py --json out.json

Both sides load one saved full-precision checkpoint with transformers'
`BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)`; PEFT wraps it with `get_peft_model`,
peftfx captures it (its bnb layers adopted as buffers, no dequantizing) with the same LoRA config and
weights. Reported: bytes of the model's tensors (distinct storages of parameters and buffers, the quant
store included), median and minimum eval-forward time and train-step time (forward, backward, AdamW
step) over interleaved repeats after warm-up (on a shared machine the minimum is the steadier figure). `qlora_rows(args)` returns the rows for other scripts
(tools/bench.py) to print.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

try:
    import peftfx
except ImportError:  # `python tools/bench_qlora.py` puts tools/ first on sys.path, not the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import peftfx

import torch

from peftfx.quant_store import storage_bytes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    p.add_argument("--json", help="also write the rows and settings here")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.heads, args.vocab = 128, 2, 344, 4, 1000
        args.batch, args.seq, args.repeats, args.warmup = 2, 32, 3, 1
    return args


def _models(args: argparse.Namespace, folder: str):
    import peft
    import transformers
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant_type,
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)

    def load_quantized():
        return transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=bnb_config,
                                                             device_map="cpu")

    fp_bytes = storage_bytes(transformers.LlamaForCausalLM.from_pretrained(folder).state_dict().values())
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0)
    ref = peft.get_peft_model(load_quantized(), peft.LoraConfig(**lora))
    adapter_dir = os.path.join(folder, "adapter")
    ref.save_pretrained(adapter_dir)
    pm = peftfx.load(load_quantized(), adapter_dir, is_trainable=True)
    return {"peftfx": pm, "peft": ref}, fp_bytes


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Distinct storages of parameters and buffers, plus the quantization state bitsandbytes keeps as
    plain attributes of its weights (absmax, nested state, SCB), which are neither."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
        if getattr(p, "SCB", None) is not None:
            tensors.append(p.SCB)
    return storage_bytes([t for t in tensors if isinstance(t, torch.Tensor)])


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def qlora_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per side: model bytes, eval forward and train step medians (seconds)."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as folder:
        sides, fp_bytes = _models(args, folder)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                      for name, m in sides.items()}

        def forward(name):
            sides[name].eval()
            with torch.no_grad():
                sides[name](**inputs)

        def train_step(name):
            model = sides[name].train()
            model(**inputs, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()

        times = {(name, what): [] for name in sides for what in ("forward", "train")}
        for what, fn in (("forward", forward), ("train", train_step)):
            for _ in range(args.warmup):
                for name in sides:
                    fn(name)
            for _ in range(args.repeats):
                for name in sides:  # interleaved, so drift in machine load hits both sides alike
                    times[(name, what)].append(_timed(lambda: fn(name)))
        rows = []
        for name, model in sides.items():
            rows.append({
                "side": name, "model_bytes": _tensor_bytes(model), "fp32_model_bytes": fp_bytes,
                "forward_s": statistics.median(times[(name, "forward")]),
                "train_step_s": statistics.median(times[(name, "train")]),
                "forward_min_s": min(times[(name, "forward")]),
                "train_step_min_s": min(times[(name, "train")]),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "forward_samples": times[(name, "forward")], "train_step_samples": times[(name, "train")],
            })
        return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = qlora_rows(args)
    print(f"QLoRA ({args.quant_type}, double quant, compute fp32), Llama hidden={args.hidden} layers={args.layers} "
          f"intermediate={args.intermediate} vocab={args.vocab}; batch {args.batch} x seq {args.seq}, "
          f"LoRA r={args.rank} all-linear; {args.threads} threads; torch {torch.__version__}")
    print(f"{'side':8} {'model MiB':>10} {'fp32 MiB':>9} {'forward ms (min)':>18} {'train step ms (min)':>20} "
          f"{'trainable':>10}")
    for r in rows:
        forward = f"{r['forward_s'] * 1e3:.1f} ({r['forward_min_s'] * 1e3:.1f})"
        train = f"{r['train_step_s'] * 1e3:.1f} ({r['train_step_min_s'] * 1e3:.1f})"
        print(f"{r['side']:8} {r['model_bytes'] / 2**20:10.2f} {r['fp32_model_bytes'] / 2**20:9.2f} {forward:>18} "
              f"{train:>20} {r['trainable']:10,d}")
    print(f"medians (minimums) of {args.repeats} interleaved repeats; load average at the end: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
