"""Side-by-side benchmark: peftfx vs HF PEFT, LoRA on a randomly initialised Llama, CPU, fp32.

Run from the repository root:

    python -m peftfx.tools.bench                  # default sizes (a few minutes on 2 cores)
    python -m peftfx.tools.bench --no-compile     # without the torch.compile section (the slow one)
    python -m peftfx.tools.bench --quick          # tiny smoke test (about a minute)
    python -m peftfx.tools.bench --json out.json  # same, and write every sample as JSON

Both sides run in one process on deep copies of the same base model (PEFT mutates the model it
wraps) with the same LoRA config. Timings are medians of interleaved repeats (peftfx, PEFT, peftfx,
PEFT, ...) after warm-up, measured with time.perf_counter. Peak memory is measured separately: each
side runs its train steps in a fresh `multiprocessing` spawn child, which reports its peak resident
set size (VmHWM from /proc/self/status, or ru_maxrss where that is missing).

Then three more adapters of the same config are added on both sides, and the state operations are timed
the same way: set_adapter, merge + unmerge (with the weight error left behind), forward with the adapter
merged (against the plain model), and a mixed batch of four adapters (against a one-adapter batch).
Last, a smaller model pair runs under torch.compile: the first call after switching adapters, with the
graphs compiled on each side counted. Every state timed is checked to compute the same logits on both
sides (the `check` lines; `check.passed` in the JSON).

The modules: options (the command line), models (setup shared with the memory children), timing,
one module per section (eager, many_adapters, compiled, qlora, generate, dora, checkpointing, startup,
memory), checks (sanity checks and goals), report (rows, table, printed report, JSON) and run (the
driver and its SECTIONS). qlora, generate, checkpointing and startup also run alone:
`python -m peftfx.tools.bench.qlora`, `... .generate`, `... .checkpointing`, `... .startup`.
"""

from __future__ import annotations

from typing import Any, Optional


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark (see `python -m peftfx.tools.bench --help`); returns what `--json` writes.
    Imported on call, so importing a section module (e.g. `peftfx.tools.bench.qlora`) stays cheap."""
    from .run import main as run_main

    return run_main(argv)
