"""Merge: fold adapters into the base weights, so the plain base graph runs them; unmerge undoes it.

Weight arithmetic, not a graph pass: each method says how a merge changes one site's weight
(`AdapterMethod.merge_weight`: LoRA adds `scaling * B @ A`, IA3 scales rows or columns, DoRA rescales
by its magnitude) and how unmerge undoes it. This module applies that to the shared weights in place
under no_grad, checks results first with safe_merge, and on a quantized base dequantizes, changes and
requantizes each weight once. Each merge and unmerge logs on "peftfx.merge", and its loop over the
sites shows a tqdm bar once it has run for a couple of seconds (peftfx.progress), as PEFT's
merge_and_unload(progressbar=True) does.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, TypeGuard

import torch

from .errors import UnsafeMergeError
from .progress import bar, get_logger, timed
from .quant_store import QuantStore
from .quantize_weights import warn_requantize
from .state.store import AdapterStore

log = get_logger("merge")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


def merge(
    model: torch.nn.Module,
    store: AdapterStore,
    adapters: Iterable[str],
    safe_merge: bool = False,
    quant: Optional[QuantStore] = None,
    cache: Optional[dict[str, Any]] = None,
) -> None:
    """Merge each adapter into its base weights, in order. With safe_merge, every result is computed
    and checked before any weight changes. `cache` keeps what unmerge needs (DoRA's weight norms)."""
    cache = {} if cache is None else cache
    steps = [(adapter, site) for adapter in adapters for site in store.method_of(adapter).merge_sites(store, adapter)]
    if not steps:
        return
    names = list(dict.fromkeys(adapter for adapter, _ in steps))
    if safe_merge:
        with timed(log, f"checking the merge of {names} into {len(steps)} weights (safe_merge)"):
            _check(model, store, steps, quant)
    with timed(log, f"merging {names} into {len(steps)} weights"):
        _apply(model, store, steps, quant, cache, merging=True)


def _check(
    model: torch.nn.Module, store: AdapterStore, steps: list[tuple[str, Any]], quant: Optional[QuantStore]
) -> None:
    """Compute every merged weight without changing any; refuse NaN/Inf (safe_merge)."""
    trial: dict[str, torch.Tensor] = {}
    weights = _weights(model)
    with torch.no_grad():
        for adapter, site in bar(steps, desc="Checking merged weights", logger=log):
            method = store.method_of(adapter)
            path = method.weight_path(site)
            current = trial.get(path, _current(weights, quant, path).detach())
            merged = method.merge_weight(store, adapter, site, current, {})
            if not torch.isfinite(merged).all():
                raise UnsafeMergeError(
                    f"merging adapter {adapter!r} into {site.key!r} gives NaN/Inf; the adapter weights are "
                    "broken (check training), so no weight was changed."
                )
            trial[path] = merged


def unmerge(
    model: torch.nn.Module,
    store: AdapterStore,
    adapters: Iterable[str],
    quant: Optional[QuantStore] = None,
    cache: Optional[dict[str, Any]] = None,
) -> None:
    """Undo merges in reverse order, so mixed merges unwind exactly (on a quantized base, up to the
    rounding of requantizing)."""
    cache = {} if cache is None else cache
    steps = [
        (adapter, site)
        for adapter in reversed(list(adapters))
        for site in store.method_of(adapter).merge_sites(store, adapter)
    ]
    if not steps:
        return
    with timed(log, f"unmerging {list(dict.fromkeys(a for a, _ in steps))} from {len(steps)} weights"):
        _apply(model, store, steps, quant, cache, merging=False)


def _quantized(quant: Optional[QuantStore], path: str) -> TypeGuard[QuantStore]:
    return quant is not None and quant.holds(path)


def _current(weights: dict[str, torch.Tensor], quant: Optional[QuantStore], path: str) -> torch.Tensor:
    """The weight as it is now: dequantized when it lives in the quant store."""
    return quant.get(path).dequantize() if _quantized(quant, path) else weights[path]


def _apply(
    model: torch.nn.Module,
    store: AdapterStore,
    steps: list[tuple[str, Any]],
    quant: Optional[QuantStore],
    cache: dict[str, Any],
    merging: bool,
) -> None:
    """Change each weight in place; quantized weights are changed in full precision, then requantized once."""
    weights = _weights(model)
    quantized: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        desc = "Merging adapters into the model" if merging else "Unmerging adapters"
        for adapter, site in bar(steps, desc=desc, logger=log):
            method = store.method_of(adapter)
            path = method.weight_path(site)
            change = method.merge_weight if merging else method.unmerge_weight
            site_cache = cache.setdefault(f"{adapter}:{path}", {})
            if _quantized(quant, path):
                base = quantized[path] if path in quantized else quant.get(path).dequantize()
                quantized[path] = change(store, adapter, site, base, site_cache)
            else:
                weight = weights[path]
                weight.copy_(change(store, adapter, site, weight.detach(), site_cache))
    if quantized:
        assert quant is not None  # only weights the quant store holds are in `quantized`
        warn_requantize("merging into" if merging else "unmerging from")
        for path, merged in bar(
            quantized.items(), desc="Requantizing merged weights", total=len(quantized), logger=log
        ):
            quant.replace(path, quant.get(path).requantized(merged))
