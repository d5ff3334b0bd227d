"""LoRA: `y = W x + scaling * B(A(dropout(x)))` on every targeted linear op (PEFT's LoraModel).

Sites are linear ops (nn.Linear, F.linear, GPT-2's Conv1D) chosen by PEFT's matching rules
(peftfx/select.py); each gets A [r, in] and B [out, r] (PEFT's `lora_A.<adapter>.weight` naming) and a
non-persistent scaling tensor, so adapters that differ only in alpha share one graph. The graph math is
passes/lora.py; merging folds `scaling * B @ A` into W; weighted combination is peftfx/combine.py.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, cast

import torch
from torch import nn

from peftfx.passes import lora as lora_pass

from .. import select
from ..config import LoraConfig
from .base import PEFT_PREFIX, AdapterMethod, AdapterPlan, Entry, MethodEnv, modules_to_save_paths

if TYPE_CHECKING:
    from ..state.store import AdapterStore


@dataclass(frozen=True)
class LoraSlot:
    """What the LoRA pass needs to know about one adapted site of one adapter."""

    key: str
    r: int
    alpha: float
    scaling: float
    dropout: float
    in_features: int
    out_features: int
    fan_in_fan_out: bool
    weight_path: str
    bias_path: Optional[str]


class Lora(AdapterMethod):
    name = "lora"
    peft_type = "LORA"
    config_class = LoraConfig
    passes = (lora_pass.PASS,)
    can_merge = can_stack = can_mix = can_combine = banked = True

    def claims(self, config: Any) -> bool:
        return isinstance(config, LoraConfig) and not config.use_dora

    # -- adding ---------------------------------------------------------------------------------------

    def plan(self, env: MethodEnv, name: str, config: Any) -> AdapterPlan:
        slots = plan_slots(env, config)
        saved = modules_to_save_paths(env.model, config)
        return AdapterPlan(name, config, self, slots, saved, trainable_biases(env.model, config, slots, saved))

    def entries(self, env: MethodEnv, plan: AdapterPlan) -> list[Entry]:
        out = []
        for slot in plan.sites:
            for which, shape in (("A", (slot.r, slot.in_features)), ("B", (slot.out_features, slot.r))):
                out.append(
                    Entry(
                        f"{PEFT_PREFIX}{slot.key}.lora_{which}.weight",
                        "store",
                        lora_weight_path(slot.key, plan.name, which),
                        shape,
                    )
                )
        return out

    def create(self, env: MethodEnv, plan: AdapterPlan) -> None:
        params = dict(env.model.named_parameters())
        init = cast(LoraConfig, plan.config).init_lora_weights
        for slot in plan.sites:
            weight = params[slot.weight_path]
            add_lora_tensors(env.store, plan.name, slot, init, adapter_dtype(weight), weight.device)

    # -- variants -------------------------------------------------------------------------------------

    def layout(self, store: "AdapterStore", adapter: str) -> tuple:
        return tuple(
            (s.key, s.r, s.dropout, str(store.site_tensor(adapter, s.key, "A").dtype))
            for s in store.sites.get(adapter, {}).values()
        )

    # -- merging --------------------------------------------------------------------------------------

    def merge_sites(self, store: "AdapterStore", adapter: str) -> Iterable[Any]:
        return store.sites.get(adapter, {}).values()

    def merge_weight(
        self, store: "AdapterStore", adapter: str, site: Any, weight: torch.Tensor, cache: dict[str, Any]
    ) -> torch.Tensor:
        return weight + delta_weight(store, adapter, site).to(weight.dtype)

    def unmerge_weight(
        self, store: "AdapterStore", adapter: str, site: Any, weight: torch.Tensor, cache: dict[str, Any]
    ) -> torch.Tensor:
        return weight - delta_weight(store, adapter, site).to(weight.dtype)


METHOD = Lora()


# -- LoRA's pieces, shared with its variants (DoRA) ----------------------------------------------------


def lora_weight_path(key: str, adapter: str, which: str) -> str:
    return f"{key}.lora_{which}.{adapter}.weight"


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """PEFT's autocast_adapter_dtype: half-precision bases get float32 adapters."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def plan_slots(env: MethodEnv, config: LoraConfig) -> list[LoraSlot]:
    """One slot per targeted linear site, with its rank and alpha (rank_pattern/alpha_pattern)."""
    sites = select.linear_sites(env.reference_graph(), env.model)
    slots = []
    for site in select.resolve_targets(sites, config, env.model):
        r, alpha = select.resolve_rank(site, config)
        slots.append(
            LoraSlot(
                site.key,
                r,
                alpha,
                config.scaling_for(r, alpha),
                float(config.lora_dropout),
                site.in_features,
                site.out_features,
                site.fan_in_fan_out,
                site.weight_path,
                site.bias_path,
            )
        )
    warn_unmatched_patterns(config, [s.key for s in slots])
    return slots


def add_lora_tensors(
    store: "AdapterStore", adapter: str, slot: LoraSlot, init: Any, dtype: torch.dtype, device: torch.device
) -> None:
    """A and B as PEFT lays them out (`<key>.lora_A.<adapter>` an nn.Linear), plus the scaling buffer."""
    store.add_site(adapter, slot.key, slot)
    a = nn.Linear(slot.in_features, slot.r, bias=False, device=device, dtype=dtype)
    b = nn.Linear(slot.r, slot.out_features, bias=False, device=device, dtype=dtype)
    store.add_site_module(adapter, slot.key, "lora_A", a, {"A": "weight"})
    store.add_site_module(adapter, slot.key, "lora_B", b, {"B": "weight"})
    init_lora(a.weight, b.weight, init, slot.r)
    store.add_site_buffer(adapter, slot.key, "scaling", torch.tensor(slot.scaling, dtype=dtype, device=device))


def init_lora(a: torch.Tensor, b: torch.Tensor, init: Any, r: int) -> None:
    """PEFT's initialisations: True = kaiming-uniform A and zero B (an identity adapter), 'gaussian' =
    normal(0, 1/r) A and zero B, False = both random (a non-identity adapter, for tests)."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)


def lora_weights(store: "AdapterStore", adapter: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = store.site_tensors(adapter)[key]
    return tensors["A"], tensors["B"]


def delta_weight(store: "AdapterStore", adapter: str, slot: LoraSlot) -> torch.Tensor:
    """`scaling * B @ A` in the base weight's own layout ((in, out) for Conv1D: fan_in_fan_out)."""
    a, b = lora_weights(store, adapter, slot.key)
    delta = (b @ a) * slot.scaling
    return delta.T if slot.fan_in_fan_out else delta


def warn_unmatched_patterns(config: LoraConfig, keys: list[str]) -> None:
    """PEFT's RuntimeWarning for rank_pattern/alpha_pattern keys that match no adapted site: a typo there
    silently leaves the default rank or alpha."""
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, name)
        unmatched = sorted(p for p in patterns if not any(select.pattern_value({p: True}, k, False) for k in keys))
        if unmatched:
            warnings.warn(
                f"The following {name} keys did not match any targeted module and were ignored: {unmatched}.",
                RuntimeWarning,
                stacklevel=5,
            )


def trainable_biases(
    model: torch.nn.Module, config: LoraConfig, slots: Sequence[LoraSlot], saved: list[str]
) -> list[str]:
    """PEFT's bias option: 'all' trains every parameter named like a bias, 'lora_only' the adapted ones.
    Biases of modules_to_save modules are left out: their trainable copies already carry them, and
    PEFT too leaves the unused original frozen (same trainable count)."""
    if config.bias == "all":
        return [n for n, _ in model.named_parameters() if "bias" in n and not any(n.startswith(p + ".") for p in saved)]
    if config.bias == "lora_only":
        return [s.bias_path for s in slots if s.bias_path]
    return []
