"""QLoRA benchmark: peftfx vs HF PEFT on the same bitsandbytes-quantized Llama, CPU, in one run.

    python -m peftfx.tools.bench.qlora            # default sizes (about a minute on 2 cores)
    python -m peftfx.tools.bench.qlora --quick    # smoke test
    python -m peftfx.tools.bench.qlora --json out.json

Both sides load one saved full-precision checkpoint with transformers'
`BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)`; PEFT wraps it with `get_peft_model`,
peftfx captures it (its bnb layers adopted as buffers, no dequantizing) with the same LoRA config and
weights. Reported: bytes of the model's tensors (distinct storages of parameters and buffers, the quant
store included), median and minimum eval-forward time and train-step time (forward, backward, AdamW
step) over interleaved repeats after warm-up (on a shared machine the minimum is the steadier figure).
`qlora_rows(args)` returns the rows for other scripts to print; `run_section` and `table_rows` are the
QLoRA rows of `python -m peftfx.tools.bench`.

Kernels: peftfx's graph runs `torch.ops.bitsandbytes.dequantize_4bit` + `aten.linear` on every CPU. bnb's
`Linear4bit` does the same, except in eval mode under no_grad on a CPU with AVX512-BF16, where it repacks
its weight and runs a bf16 kernel (other numerics; only for in_features % blocksize == 0 and
out_features % 32 == 0, else it fails). The main rows pin PEFT's layers to the dequantize path, so both
sides compute the same on any host (checked: `logit_diff`). On a host with the packed kernel, one more
pair (peftfx, and PEFT left on bnb's host default) times the eval forward, with the intermediate size
rounded up to a multiple of 64 when the packed kernel cannot take it: sides "peftfx@packed" and
"peft@packed".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable

import torch

import peftfx
from peftfx.quant_store import storage_bytes

from .report import fmt_bytes, log, ratio, time_row


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


PACK_BLOCK_N = 32  # bnb's packed CPU layout groups output rows by 32 (_convert_weight_packed_for_cpu)


def pin_dequantize_path(model: torch.nn.Module) -> int:
    """Pin every bnb Linear4bit of `model` to bnb's dequantize + matmul path (the flag is per module, set
    from the CPU in `__init__`); returns how many layers were pinned."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        state = getattr(m.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("a bnb layer is repacked already (it ran in eval under no_grad): pin before running it")
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def packed_kernel_on_host() -> bool:
    """Whether bnb's Linear4bit takes its repacked AVX512-BF16 kernel at inference on this CPU (bnb's own
    per-module decision, read off a fresh layer)."""
    import bitsandbytes as bnb

    return bool(bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu)


def packable_args(args: argparse.Namespace, blocksize: int = 64) -> "argparse.Namespace | None":
    """`args` with the intermediate size rounded up so every 4-bit linear fits bnb's packed kernel
    (in_features % blocksize == 0, out_features % 32 == 0); None when the hidden size does not."""
    if args.hidden % blocksize or args.hidden % PACK_BLOCK_N:
        return None
    packable = argparse.Namespace(**vars(args))
    packable.intermediate = -(-args.intermediate // blocksize) * blocksize
    return packable


def _models(args: argparse.Namespace, folder: str, pin: bool = True):
    import peft
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )

    def load_quantized():
        return transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=bnb_config, device_map="cpu")

    fp_bytes = storage_bytes(transformers.LlamaForCausalLM.from_pretrained(folder).state_dict().values())
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0)
    ref = peft.get_peft_model(load_quantized(), peft.LoraConfig(**lora))
    if pin:
        pin_dequantize_path(ref)
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
        scb = getattr(p, "SCB", None)  # bitsandbytes' Int8Params row scales
        if scb is not None:
            tensors.append(scb)
    return storage_bytes([t for t in tensors if isinstance(t, torch.Tensor)])


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        return (a(**inputs).logits - b(**inputs).logits).abs().max().item()


def _packed_pair_rows(args: argparse.Namespace, folder: str, inputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Eval forward, peftfx vs PEFT on bnb's host kernel (the packed bf16 one), interleaved; [] when this
    host has no such kernel or the hidden size does not fit it."""
    packable = packable_args(args)
    if not packed_kernel_on_host() or packable is None:
        return []
    sides, _ = _models(packable, os.path.join(folder, "packed"), pin=False)
    diff = _max_logit_diff(sides["peftfx"], sides["peft"], inputs)  # also the warm-up that repacks PEFT's layers
    times: dict[str, list[float]] = {name: [] for name in sides}

    def forward(name):
        with torch.no_grad():
            sides[name](**inputs)

    for _ in range(args.warmup):
        for name in sides:
            forward(name)
    for _ in range(args.repeats):
        for name in sides:
            times[name].append(_timed(lambda: forward(name)))
    return [
        {
            "side": f"{name}@packed",
            "intermediate": packable.intermediate,
            "logit_diff": diff,
            "forward_s": statistics.median(times[name]),
            "forward_min_s": min(times[name]),
            "forward_samples": times[name],
        }
        for name in sides
    ]


def qlora_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per side: model bytes, eval forward and train step medians (seconds); on a host with bnb's
    packed AVX512-BF16 kernel, two more (sides "peftfx@packed", "peft@packed"): eval forward only."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as folder:
        sides, fp_bytes = _models(args, folder)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        logit_diff = _max_logit_diff(sides["peftfx"], sides["peft"], inputs)
        optimizers = {
            name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for name, m in sides.items()
        }

        def forward(name):
            sides[name].eval()
            with torch.no_grad():
                sides[name](**inputs)

        def train_step(name):
            model = sides[name].train()
            model(**inputs, labels=ids).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()

        times: dict[tuple[str, str], list[float]] = {
            (name, what): [] for name in sides for what in ("forward", "train")
        }
        for what, fn in (("forward", forward), ("train", train_step)):
            for _ in range(args.warmup):
                for name in sides:
                    fn(name)
            for _ in range(args.repeats):
                for name in sides:  # interleaved, so drift in machine load hits both sides alike
                    times[(name, what)].append(_timed(lambda: fn(name)))
        rows = []
        for name, model in sides.items():
            rows.append(
                {
                    "side": name,
                    "model_bytes": _tensor_bytes(model),
                    "fp32_model_bytes": fp_bytes,
                    "forward_s": statistics.median(times[(name, "forward")]),
                    "train_step_s": statistics.median(times[(name, "train")]),
                    "forward_min_s": min(times[(name, "forward")]),
                    "train_step_min_s": min(times[(name, "train")]),
                    "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "forward_samples": times[(name, "forward")],
                    "train_step_samples": times[(name, "train")],
                    "logit_diff": logit_diff,
                }
            )
        return rows + _packed_pair_rows(args, folder, inputs)


def run_section(bench: Any) -> dict[str, dict[str, Any]]:
    """`qlora_rows` on the main benchmark's model sizes: side -> its row."""
    args = bench.args
    log("QLoRA: the same Llama loaded in 4-bit NF4 (double quant) by transformers, LoRA on all linears")
    q = parse_args([])
    q.hidden, q.layers, q.intermediate, q.heads, q.vocab = (
        args.hidden,
        args.layers,
        args.intermediate,
        args.heads,
        args.vocab,
    )
    q.batch, q.seq, q.rank, q.threads = args.batch, args.seq, args.r, args.threads
    q.repeats, q.warmup = max(3, args.repeats // 2), 1
    return {row["side"]: row for row in qlora_rows(q)}


def table_rows(ql: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    fx, pf = ql["peftfx"], ql["peft"]
    weights = {
        "metric": "QLoRA: model tensors (fp32 model: " + fmt_bytes(fx["fp32_model_bytes"]) + ")",
        "unit": "bytes",
        "peftfx": fx["model_bytes"],
        "peft": pf["model_bytes"],
        "ratio": fx["model_bytes"] / pf["model_bytes"],
        "peftfx_text": fmt_bytes(fx["model_bytes"]),
        "peft_text": fmt_bytes(pf["model_bytes"]),
        "ratio_text": ratio(fx["model_bytes"], pf["model_bytes"]),
    }
    rows = [
        weights,
        time_row(
            "QLoRA: eval forward (PEFT pinned to bnb's dequantize path)", fx["forward_samples"], pf["forward_samples"]
        ),
        time_row("QLoRA: train step (fwd+bwd+AdamW)", fx["train_step_samples"], pf["train_step_samples"]),
    ]
    metric = "QLoRA: eval forward vs PEFT on bnb's packed AVX512-BF16 kernel"
    if "peft@packed" in ql:  # only a CPU with AVX512-BF16 has that kernel (see above)
        fxp, pfp = ql["peftfx@packed"], ql["peft@packed"]
        rows.append(
            time_row(f"{metric} (intermediate {fxp['intermediate']})", fxp["forward_samples"], pfp["forward_samples"])
        )
    else:
        rows.append(
            {
                "metric": metric,
                "unit": "s",
                "peftfx": None,
                "peft": None,
                "ratio": None,
                "peftfx_text": "n/a",
                "peft_text": "n/a (no such kernel on this CPU)",
                "ratio_text": "-",
            }
        )
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = qlora_rows(args)
    print(
        f"QLoRA ({args.quant_type}, double quant, compute fp32), Llama hidden={args.hidden} layers={args.layers} "
        f"intermediate={args.intermediate} vocab={args.vocab}; batch {args.batch} x seq {args.seq}, "
        f"LoRA r={args.rank} all-linear; {args.threads} threads; torch {torch.__version__}"
    )
    print(
        f"{'side':8} {'model MiB':>10} {'fp32 MiB':>9} {'forward ms (min)':>18} {'train step ms (min)':>20} "
        f"{'trainable':>10}"
    )
    main_rows = [r for r in rows if "@" not in r["side"]]
    for r in main_rows:
        forward = f"{r['forward_s'] * 1e3:.1f} ({r['forward_min_s'] * 1e3:.1f})"
        train = f"{r['train_step_s'] * 1e3:.1f} ({r['train_step_min_s'] * 1e3:.1f})"
        print(
            f"{r['side']:8} {r['model_bytes'] / 2**20:10.2f} {r['fp32_model_bytes'] / 2**20:9.2f} {forward:>18} "
            f"{train:>20} {r['trainable']:10,d}"
        )
    print(
        f"PEFT pinned to bnb's dequantize + matmul path (what peftfx runs); max |logits peftfx - PEFT| = "
        f"{main_rows[0]['logit_diff']:.2e}"
    )
    packed = {r["side"]: r for r in rows if "@" in r["side"]}
    if packed:
        fx, pf = packed["peftfx@packed"], packed["peft@packed"]
        paired = statistics.median(a / b for a, b in zip(fx["forward_samples"], pf["forward_samples"]))
        print(
            f"eval forward vs PEFT on bnb's packed AVX512-BF16 kernel (intermediate {fx['intermediate']}): "
            f"peftfx {fx['forward_s'] * 1e3:.1f} ms ({fx['forward_min_s'] * 1e3:.1f}), "
            f"PEFT {pf['forward_s'] * 1e3:.1f} ms ({pf['forward_min_s'] * 1e3:.1f}); "
            f"paired ratio peftfx/PEFT {paired:.2f}x; max |logits difference| {fx['logit_diff']:.2e} (bf16 kernel)"
        )
    else:
        print(
            "eval forward vs PEFT on bnb's packed AVX512-BF16 kernel: n/a (this CPU has no such kernel: PEFT "
            "runs the dequantize path above)"
        )
    print(
        f"medians (minimums) of {args.repeats} interleaved repeats; load average at the end: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
