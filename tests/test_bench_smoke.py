"""python -m peftfx.tools.bench --quick end to end: every row is there with figures for both sides, and the sanity
checks (both sides compute the same logits in every timed state) pass. No timing thresholds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TIMED_ROWS = [  # metric prefixes of rows with samples on both sides
    "apply (median of", "eval forward, adapter disabled", "eval forward, unmerged LoRA",
    "train step (fwd+bwd+AdamW)", "eval forward, unmerged, fusion off", "train step, fusion off",
    "set_adapter default->b->default (+ peftfx's bind)",
    "bare set_adapter calls", "merge_adapter + unmerge_adapter", "eval forward, adapter merged",
    "eval forward, 1 adapter, batch", "eval forward, mixed 4 adapters, batch",
    "compiled (1-layer model, 1 thread): first call after set_adapter(new)",
    "compiled (1-layer model, 1 thread): eval forward (warm)",
    "QLoRA: eval forward (PEFT pinned to bnb's dequantize path)", "QLoRA: train step (fwd+bwd+AdamW)",
    "train step with GC (vs PEFT + GC)", "selective policy train step", "every 2nd layer train step",
    *(f"start-up {part}, {n}" for n in ("1 layer", "2 layers")
      for part in ("total", "apply", "first eval forward", "first train step (fwd+bwd)")),
    *(f"pm.compile() vs torch.compile (aot_eager), {n}: compile + first train step" for n in ("1 layer", "2 layers")),
]
OTHER_ROWS = [
    "trainable parameters", "apply, first call in process (cold)", "eval forward, plain base model (reference)",
    "train step, first call (cold)", "floor: frozen base fwd+bwd", "train step above the floor", "set_adapter default->b->default, first time (cold)",
    "merge + unmerge, first call (cold)", "max |W - W0| after 1 merge + unmerge", "mixed batch of 4 adapters, first call",
    "... mixed / single-adapter batch", "compiled (1-layer model, 1 thread): first call (compiles)",
    "graphs compiled by those 3 switches", "compiled (1-layer model, 1 thread): first call after set_adapter(default)",
    "graphs compiled by that switch back",
    "compiled (1-layer model, 1 thread): unmerged / base forward (adapters disabled)", "peak RSS, whole child", "peak RSS, steady-state train steps",
    "activations with GC (vs PEFT + GC)", "activations without GC (vs PEFT)", "selective policy activations",
    "every 2nd layer activations",
    "long seq (256 tokens) train step peak RSS, no GC", "long seq (256 tokens) train step peak RSS, with GC",
    "long seq peak above RSS before the step, no GC", "long seq peak above RSS before the step, with GC",
]


@pytest.mark.slow
def test_quick_benchmark_has_every_row_and_passes_its_checks(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "peftfx.tools.bench", "--quick", "--threads", "1", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["metric"].strip(): r for r in result["rows"]}

    def row(prefix: str) -> dict:
        found = [r for name, r in rows.items() if name.startswith(prefix.strip())]
        assert len(found) == 1, f"{prefix!r}: {len(found)} rows in {sorted(rows)}"
        return found[0]

    for prefix in TIMED_ROWS:
        r = row(prefix)
        assert len(r["peftfx_samples"]) == len(r["peft_samples"]) > 0
        assert all(x > 0 for x in r["peftfx_samples"] + r["peft_samples"])
        assert r["paired_ratio"] > 0
    for prefix in OTHER_ROWS:
        r = row(prefix)
        assert r["peftfx"] is not None and r["peft"] is not None, prefix
    # peftfx vs PEFT on bnb's packed kernel: timed where this CPU has it (AVX512-BF16), else marked n/a
    from peftfx.tools.bench.qlora import packed_kernel_on_host
    packed = row("QLoRA: eval forward vs PEFT on bnb's packed AVX512-BF16 kernel")
    if packed_kernel_on_host():
        assert len(packed["peftfx_samples"]) == len(packed["peft_samples"]) > 0 and packed["paired_ratio"] > 0
    else:
        assert packed["peftfx"] is None and packed["peft"] is None
    relative = [r for r in result["rows"] if r["metric"].strip() == "... relative to plain base forward"]
    assert len(relative) == 2 and all(r["peftfx"] > 0 and r["peft"] > 0 for r in relative)  # unmerged, merged

    assert result["check"]["passed"], result["check"]["items"]
    assert "QLoRA eager logits, peftfx vs PEFT" in result["check"]["items"]
    assert {g["goal"] for g in result["goals"]} == {"set_adapter", "merged_forward", "mixed_batch", "no_recompile",
                                                   "unmerged_forward", "train_step", "compiled_unmerged_forward",
                                                   "generate", "gc_activations", "gc_step", "selective_activations",
                                                   "selective_step", "startup_layers", "startup_vs_peft",
                                                   "compile_startup_layers", "compile_startup_vs_peft"}
    compiled = result["sections"]["compile"]
    assert compiled["peftfx_error_on_recompile_probe"] == "ok"
    assert sum(compiled["switch_frames"]["peftfx"]) == 0  # same-layout switches compile nothing in peftfx
    assert all("error" not in result["memory"][side] for side in ("peftfx", "peft"))
