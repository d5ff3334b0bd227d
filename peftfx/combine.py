"""Combining adapters into a new one (PEFT's add_weighted_adapter): linear, cat and svd.

Each rule maps the adapters present at one site, with their weights, to the new adapter's (A, B) there.
The new adapter has r = lora_alpha = the combined rank, as in PEFT, so its scaling is 1 (sqrt(r) with
rsLoRA); the adapters' own scalings are folded into the combined matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, cast

import torch

from .config import LoraConfig
from .errors import ConfigError
from .state.store import AdapterStore


@dataclass(frozen=True)
class Part:
    """One source adapter at one site."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    weight: float


def _linear(parts: list[Part], rank: int, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.zeros_like(parts[0].a)
    b = torch.zeros_like(parts[0].b)
    for p in parts:
        w = p.weight * p.scaling
        root = math.sqrt(abs(w))
        a += (root if w >= 0 else -root) * p.a
        b += root * p.b
    return a, b


def _cat(parts: list[Part], rank: int, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([p.a * p.weight * p.scaling for p in parts], dim=0)
    b = torch.cat([p.b for p in parts], dim=1)
    return a, b


def _svd(parts: list[Part], rank: int, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    delta = sum(p.weight * (p.b @ p.a) * p.scaling for p in parts)
    u, s, vh = torch.linalg.svd(
        delta, full_matrices=options.get("svd_full_matrices", True), driver=options.get("svd_driver")
    )
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    clamp = options.get("svd_clamp")
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh, u


COMBINATIONS: dict[str, Callable[[list[Part], int, dict], tuple[torch.Tensor, torch.Tensor]]] = {
    "linear": _linear,
    "cat": _cat,
    "svd": _svd,
}


def combined_rank(store: AdapterStore, adapters: list[str], combination_type: str, svd_rank: Optional[int]) -> int:
    """PEFT's rank rule: linear needs equal ranks, cat sums them, svd takes svd_rank or the largest."""
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type {combination_type!r} is not supported; use one of {sorted(COMBINATIONS)}.")
    missing = [a for a in adapters if a not in store.configs]
    if missing:
        raise ConfigError(f"cannot combine unknown adapter(s) {missing}; loaded: {store.adapter_names()}.")
    # the largest rank any site of an adapter may have, as PEFT allocates
    configs = [cast(LoraConfig, store.configs[a]) for a in adapters]  # only LoRA's method can_combine
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ConfigError(
                f"combination_type 'linear' needs adapters of one rank, got ranks {ranks}; use 'cat' or 'svd'."
            )
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def combine_site(
    store: AdapterStore,
    key: str,
    adapters: list[str],
    weights: list[float],
    combination_type: str,
    rank: int,
    options: dict,
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The new (A, B) at one site, padded to `rank`; None where no source adapter touches the site."""
    parts = []
    for adapter, weight in zip(adapters, weights):
        slot = store.sites.get(adapter, {}).get(key)
        if slot is not None:
            tensors = store.site_tensors(adapter)[key]
            a, b = tensors["A"], tensors["B"]
            parts.append(Part(a.detach(), b.detach(), slot.scaling, float(weight)))
    if not parts:
        return None
    a, b = COMBINATIONS[combination_type](parts, rank, options)
    out_a = torch.zeros(rank, a.shape[1], dtype=a.dtype, device=a.device)
    out_b = torch.zeros(b.shape[0], rank, dtype=b.dtype, device=b.device)
    out_a[: a.shape[0]] = a
    out_b[:, : b.shape[1]] = b
    return out_a, out_b
