"""Many adapters on the eager model pair: three more adapters of the same config on both sides, then
set_adapter, merge + unmerge (with the weight error left behind), forward with the adapter merged
(against the plain model), and a mixed batch of four adapters (against a one-adapter batch).
"""

from __future__ import annotations

import argparse
import gc
from typing import Any, Callable

import torch

from .models import (
    ADAPTERS,
    SIDES,
    add_same_adapters,
    base_weights,
    make_inputs,
    max_abs_diff,
    max_weight_error,
    no_grad_call,
)
from .report import cold_row, log, relative_row, time_row, value_row
from .timing import interleaved, looped, timed


def bench_switch(pm: Any, pp: Any, inputs: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:
    """set_adapter default -> b -> default, both adapters loaded on each side.

    peftfx's set_adapter only records the choice (and requires_grad); the variant lookup and the slot
    bank's re-binding to the chosen adapter's tensors happen at the next call. So the headline figure
    also does that lookup after each switch (`pm.graph_module` runs the same `_variant` lookup and bind
    a call does), which is the whole cost of switching; the bare set_adapter is reported too.
    PEFT's set_adapter does all its work (walking every LoRA layer) at once."""
    no_grad_call(pm, inputs)()  # the last call's capture (eval) is the one graph_module looks up

    def fx_bound():
        pm.set_adapter("b")
        pm.graph_module  # noqa: B018 - the lookup + bind of the next call
        pm.set_adapter("default")
        pm.graph_module  # noqa: B018

    def fx_bare():
        pm.set_adapter("b")
        pm.set_adapter("default")

    def pf():
        pp.set_adapter("b")
        pp.set_adapter("default")

    gc.collect()
    cold = {"peftfx": timed(fx_bound), "peft": timed(pf)}  # b has never been bound / activated before
    n = args.switch_inner
    raw = interleaved(
        {"peftfx": looped(fx_bound, n), "peftfx_bare": looped(fx_bare, n), "peft": looped(pf, n)},
        args.warmup,
        args.repeats,
    )
    samples = {k: [x / n for x in v] for k, v in raw.items()}
    assert pm.active_adapters == ["default"] and pp.active_adapters == ["default"]
    with torch.no_grad():  # the switched-back state computes what PEFT's does
        diff = max_abs_diff(pm(**inputs).logits, pp(**inputs).logits)
    return {"cold": cold, "samples": samples, "logit_diff_after": diff}


def bench_merge(
    pm: Any, pp: Any, base: torch.nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """merge_adapter() + unmerge_adapter() of the active adapter, then forwards with it merged."""
    models = {"peftfx": pm, "peft": pp}
    w0 = {s: base_weights(m) for s, m in models.items()}
    with torch.no_grad():
        unmerged = {s: m(**inputs).logits for s, m in models.items()}

    def cycle(m: Any) -> Callable[[], None]:
        def run():
            m.merge_adapter()
            m.unmerge_adapter()

        return run

    cycles = {s: cycle(m) for s, m in models.items()}
    gc.collect()
    cold = {s: timed(cycles[s]) for s in SIDES}
    err_one = {s: max_weight_error(models[s], w0[s]) for s in SIDES}
    samples = interleaved(cycles, args.warmup, args.repeats)
    n_cycles = 1 + args.warmup + args.repeats
    err_all = {s: max_weight_error(models[s], w0[s]) for s in SIDES}

    for m in models.values():
        m.merge_adapter()
    with torch.no_grad():
        merged = {s: m(**inputs).logits for s, m in models.items()}
    fw = interleaved(
        {"base": no_grad_call(base, inputs), "peftfx": no_grad_call(pm, inputs), "peft": no_grad_call(pp, inputs)},
        args.warmup,
        args.fwd_repeats,
    )
    for m in models.values():
        m.unmerge_adapter()
    return {
        "cold": cold,
        "samples": samples,
        "err_one_cycle": err_one,
        "err_all_cycles": err_all,
        "n_cycles": n_cycles,
        "fw": fw,
        "merged_vs_unmerged": {s: max_abs_diff(merged[s], unmerged[s]) for s in SIDES},
        "merged_fx_vs_peft": max_abs_diff(merged["peftfx"], merged["peft"]),
    }


def bench_mixed(pm: Any, pp: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One batch whose rows use adapters default, b, c, d (adapter_names=) vs the same batch with the
    single active adapter; at least 4 rows, so every adapter has one."""
    rows = max(args.batch, len(ADAPTERS))
    inputs = make_inputs(argparse.Namespace(**{**vars(args), "batch": rows}))
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(rows)]
    for m in (pm, pp):
        m.set_adapter("default")
    gc.collect()
    cold = {
        "peftfx": timed(no_grad_call(pm, inputs, adapter_names=names)),  # builds the mixed variant
        "peft": timed(no_grad_call(pp, inputs, adapter_names=names)),
    }
    with torch.no_grad():
        got = {"peftfx": pm(**inputs, adapter_names=names).logits, "peft": pp(**inputs, adapter_names=names).logits}
        per_row = 0.0  # each mixed row against a plain call with that row's adapter active (peftfx)
        for adapter in ADAPTERS:
            pm.set_adapter(adapter)
            alone = pm(**inputs).logits
            idx = [i for i, n in enumerate(names) if n == adapter]
            per_row = max(per_row, max_abs_diff(got["peftfx"][idx], alone[idx]))
        pm.set_adapter("default")
    fns = {
        "peftfx_single": no_grad_call(pm, inputs),
        "peftfx_mixed": no_grad_call(pm, inputs, adapter_names=names),
        "peft_single": no_grad_call(pp, inputs),
        "peft_mixed": no_grad_call(pp, inputs, adapter_names=names),
    }
    samples = interleaved(fns, args.warmup, args.fwd_repeats)
    return {
        "rows": rows,
        "names": names,
        "cold": cold,
        "samples": samples,
        "fx_vs_peft": max_abs_diff(got["peftfx"], got["peft"]),
        "fx_mixed_vs_single_rows": per_row,
    }


def run_section(bench: Any) -> dict[str, Any]:
    """Adds adapters b, c, d to `bench.pm` and `bench.pp` (later sections keep them)."""
    pm, pp, args = bench.pm, bench.pp, bench.args
    log(f"adding adapters {', '.join(ADAPTERS[1:])} (same config) on both sides")
    add_same_adapters(pm, pp, list(ADAPTERS[1:]), args)
    log("set_adapter default -> b -> default")
    sw = bench_switch(pm, pp, bench.inputs, args)
    log("merge_adapter + unmerge_adapter, then eval forward with the adapter merged (plain model, peftfx, PEFT)")
    mg = bench_merge(pm, pp, bench.base, bench.inputs, args)
    log(f"mixed batch: adapter_names over {len(ADAPTERS)} adapters vs one active adapter")
    mx = bench_mixed(pm, pp, args)
    return {"switch": sw, "merge": mg, "mixed": mx}


def table_rows(many: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    return state_rows(many["switch"], many["merge"], many["mixed"], args)


def state_rows(sw: dict, mg: dict, mx: dict, args: argparse.Namespace) -> list[dict[str, Any]]:
    n, k = mg["n_cycles"], len(ADAPTERS)
    s, m = sw["samples"], mx["samples"]
    return [
        cold_row("set_adapter default->b->default, first time (cold)", sw["cold"]["peftfx"], sw["cold"]["peft"]),
        time_row("set_adapter default->b->default (+ peftfx's bind)", s["peftfx"], s["peft"]),
        time_row("  bare set_adapter calls (peftfx binds at next call)", s["peftfx_bare"], s["peft"]),
        cold_row("merge + unmerge, first call (cold)", mg["cold"]["peftfx"], mg["cold"]["peft"]),
        time_row("merge_adapter + unmerge_adapter", mg["samples"]["peftfx"], mg["samples"]["peft"]),
        value_row(
            "  max |W - W0| after 1 merge + unmerge",
            "abs",
            mg["err_one_cycle"]["peftfx"],
            mg["err_one_cycle"]["peft"],
            lambda e: f"{e:.1e}",
        ),
        value_row(
            f"  max |W - W0| after {n} merge + unmerge",
            "abs",
            mg["err_all_cycles"]["peftfx"],
            mg["err_all_cycles"]["peft"],
            lambda e: f"{e:.1e}",
        ),
        time_row("eval forward, adapter merged", mg["fw"]["peftfx"], mg["fw"]["peft"]),
        relative_row(
            "  ... relative to plain base forward", mg["fw"], {"peftfx": ("peftfx", "base"), "peft": ("peft", "base")}
        ),
        cold_row(f"mixed batch of {k} adapters, first call (cold)", mx["cold"]["peftfx"], mx["cold"]["peft"]),
        time_row(f"eval forward, 1 adapter, batch {mx['rows']}", m["peftfx_single"], m["peft_single"]),
        time_row(f"eval forward, mixed {k} adapters, batch {mx['rows']}", m["peftfx_mixed"], m["peft_mixed"]),
        relative_row(
            "  ... mixed / single-adapter batch",
            m,
            {"peftfx": ("peftfx_mixed", "peftfx_single"), "peft": ("peft_mixed", "peft_single")},
        ),
    ]
