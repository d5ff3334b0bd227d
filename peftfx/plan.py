"""Adapter plans: what adding an adapter will create, computed and validated before anything changes.

Splitting plan from commit is what makes every add (apply, load, add_weighted_adapter) all-or-nothing:
a bad rank, an unmatched target or a checkpoint that does not fit is found while the model and the
store are still untouched.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import fx

from . import select
from .adapters import AdapterStore, LoraSlot
from .config import LoraConfig
from .errors import TargetNotFoundError


@dataclass
class AdapterPlan:
    """Everything an adapter consists of: its LoRA sites, saved modules and trained biases."""

    name: str
    config: LoraConfig
    slots: list[LoraSlot]
    saved_paths: list[str]
    bias_names: list[str]


def make_plan(gm: fx.GraphModule, model: torch.nn.Module, name: str, config: LoraConfig) -> AdapterPlan:
    sites = select.linear_sites(gm, model)
    slots = []
    for site in select.resolve_targets(sites, config, model):
        r, alpha = select.resolve_rank(site, config)
        slots.append(LoraSlot(site.key, r, alpha, config.scaling_for(r, alpha), float(config.lora_dropout),
                              site.in_features, site.out_features, site.fan_in_fan_out,
                              site.weight_path, site.bias_path))
    warn_unmatched_patterns(config, [s.key for s in slots])
    saved = modules_to_save_paths(model, config)
    return AdapterPlan(name, config, slots, saved, trainable_biases(model, config, slots, saved))


def warn_unmatched_patterns(config: LoraConfig, keys: list[str]) -> None:
    """PEFT's RuntimeWarning for rank_pattern/alpha_pattern keys that match no adapted site: a typo there
    silently leaves the default rank or alpha."""
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, name)
        unmatched = sorted(p for p in patterns if not any(select.pattern_value({p: True}, k, False) for k in keys))
        if unmatched:
            warnings.warn(f"The following {name} keys did not match any targeted module and were ignored: "
                          f"{unmatched}.", RuntimeWarning, stacklevel=4)


def existing_plan(store: AdapterStore, name: str) -> AdapterPlan:
    """The plan of an adapter already in the store (what save_pretrained writes)."""
    return AdapterPlan(name, store.configs[name], list(store.lora.get(name, {}).values()),
                       list(store.saved.get(name, {})), list(store.bias_names.get(name, [])))


def modules_to_save_paths(model: torch.nn.Module, config: LoraConfig) -> list[str]:
    """Module paths ending in a modules_to_save name (PEFT's rule). PEFT writes the task heads of
    every architecture (classifier and score), so only a list that matches nothing is an error."""
    wanted = config.resolved_modules_to_save()
    module_names = [n for n, _ in model.named_modules() if n]
    found = [n for n in module_names if any(n == w or n.endswith(f".{w}") for w in wanted)]
    if wanted and not found and config.modules_to_save:
        raise TargetNotFoundError(
            f"modules_to_save={config.modules_to_save!r} matches no module of {type(model).__name__}; "
            f"top-level modules: {[n for n in module_names if '.' not in n]}.")
    return [n for n in found if not any(n.startswith(p + ".") for p in found)]


def trainable_biases(model: torch.nn.Module, config: LoraConfig, slots: list[LoraSlot], saved: list[str]) -> list[str]:
    """PEFT's bias option: 'all' trains every parameter named like a bias, 'lora_only' the adapted ones.
    Biases of modules_to_save modules are left out: their trainable copies already carry them, and
    PEFT too leaves the unused original frozen (same trainable count)."""
    if config.bias == "all":
        return [n for n, _ in model.named_parameters()
                if "bias" in n and not any(n.startswith(p + ".") for p in saved)]
    if config.bias == "lora_only":
        return [s.bias_path for s in slots if s.bias_path]
    return []


def commit_plan(model: torch.nn.Module, store: AdapterStore, plan: AdapterPlan, trainable: bool) -> None:
    """Create the plan's tensors. The first adapter freezes the base model, as PEFT does."""
    if not store.configs:
        for p in model.parameters():
            p.requires_grad_(False)
    params = dict(model.named_parameters())
    for slot in plan.slots:
        weight = params[slot.weight_path]
        # PEFT's autocast_adapter_dtype: half-precision bases get float32 adapters
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        store.add_lora(plan.name, slot, plan.config.init_lora_weights, dtype, weight.device)
    for path in plan.saved_paths:
        store.add_saved_module(plan.name, path, model.get_submodule(path))
    for bias in plan.bias_names:
        params[bias].requires_grad_(not plan.config.inference_mode)
    store.configs[plan.name] = plan.config
    store.bias_names[plan.name] = plan.bias_names
    store.set_trainable(plan.name, trainable)
