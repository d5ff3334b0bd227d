"""The benchmark's driver: one shared model setup, then each section of SECTIONS in order, then the
report. A section measures (`run`, skipped by its `--no-...` flag) and turns what it measured into
rows of the table (`rows`); the checks and goals read the sections' results.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from . import checkpointing, compiled, dora, eager, generate, many_adapters, memory, qlora, startup
from .checks import judge
from .models import build_base, make_inputs
from .options import parse_args
from .report import loadavg, log, print_report, write_json


@dataclass
class Bench:
    """What the sections share: the settings, the base model and inputs, and (after the eager section)
    the adapted pair, peftfx's `pm` and PEFT's `pp`."""

    args: Any
    base: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    n_base: int
    pm: Any = None
    pp: Any = None


class Section(NamedTuple):
    key: str  # its entry in the results (and in checks.judge)
    skip: Optional[str]  # the flag (args attribute) that skips it
    run: Callable[[Bench], Any]
    rows: Callable[[Any, Any], list[dict[str, Any]]]


# In run order; the eager pair is made first and the many-adapters section adds adapters to it. Memory
# runs last (spawn children), so nothing is being timed while they run; start-up runs its own children
# one at a time, after its timings.
SECTIONS = (
    Section("eager", None, eager.run_section, eager.table_rows),
    Section("adapters", None, many_adapters.run_section, many_adapters.table_rows),
    Section("compile", "no_compile", compiled.run_section, compiled.table_rows),
    Section("qlora", "no_qlora", qlora.run_section, qlora.table_rows),
    Section("generate", "no_generate", generate.run_section, generate.table_rows),
    Section("dora", None, dora.run_section, dora.table_rows),
    Section("checkpointing", "no_checkpointing", checkpointing.run_section, checkpointing.table_rows),
    Section("startup", "no_startup", startup.run_section, startup.table_rows),
    Section("memory", "no_memory", memory.run_section, memory.table_rows),
)


def setup(args: Any) -> Bench:
    base = build_base(args)
    inputs = make_inputs(args)
    n_base = sum(p.numel() for p in base.parameters())
    log(
        f"Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {n_base / 1e6:.1f}M params; "
        f"batch {args.batch} x {args.seq}; {args.threads} threads"
    )
    return Bench(args, base, inputs, n_base)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import peft  # noqa: F401  - imported before anything is timed
    import transformers  # noqa: F401

    import peftfx  # noqa: F401

    torch.set_num_threads(args.threads)
    load_start = loadavg()
    t_start = time.perf_counter()
    bench = setup(args)
    results: dict[str, Any] = {}
    for section in SECTIONS:
        skipped = section.skip is not None and getattr(args, section.skip)
        results[section.key] = None if skipped else section.run(bench)
    elapsed = time.perf_counter() - t_start
    load = (load_start, loadavg())
    rows = [row for s in SECTIONS if results[s.key] is not None for row in s.rows(results[s.key], args)]
    checks, goals = judge(results)
    result = print_report(args, bench.n_base, results, rows, checks, goals, elapsed, load)
    if args.json:
        write_json(args.json, result)
    return result
