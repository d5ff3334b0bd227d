"""Selection: find the linear ops of a captured graph and decide, with PEFT's exact rules, which an
adapter targets.

Targets are ops, not module classes: `aten.linear` (nn.Linear, and F.linear in custom code) and
`aten.addmm` with a parameter as its (in, out) matrix (GPT-2's Conv1D, PEFT's fan_in_fan_out). Each
site gets a *key*, the name PEFT would give it: the module path when the module owns the weight as
`.weight`, else the parameter's path (e.g. `block.w1` for `F.linear(x, self.w1)`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union, cast

import torch
from torch import fx

from .capture import OWNERS_META
from .config import ALL_LINEAR, DEFAULT_LORA_TARGETS, LoraConfig
from .errors import ConfigError, TargetNotFoundError
from .rewrite.annotations import Site, mark_site
from .rewrite.layout import LINEAR_OPS

aten = torch.ops.aten


@dataclass(frozen=True)
class LinearSite:
    """A linear op in a graph: where its input and weight come from and what PEFT would call it."""

    node: fx.Node
    key: str
    weight_path: str
    x: fx.Node
    in_features: int
    out_features: int
    fan_in_fan_out: bool
    bias_path: Optional[str]


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node, from the nn_module_stack export records."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def linear_sites(gm: fx.GraphModule, model: torch.nn.Module) -> list[LinearSite]:
    """Every linear op whose weight is a parameter of `model`, in graph order."""
    params = dict(model.named_parameters(remove_duplicate=False))
    by_id: dict[int, str] = {}
    for name, p in params.items():
        by_id.setdefault(id(p), name)
    graph_tensors = dict(gm.named_parameters(remove_duplicate=False))
    # A graph captured from a sharded model (FSDP2) holds placeholders: the model's tensor for a target is
    # the one its owning module holds now (Capture.owners).
    for target, (found, key) in gm.meta.get(OWNERS_META, {}).items():
        if target in graph_tensors and key in found:
            graph_tensors[target] = found[key]
    sites = []
    for node in gm.graph.nodes:
        reader = LINEAR_OPS.get(node.target) if node.op == "call_function" else None
        if reader is None:
            continue
        parts = reader(node)
        if parts is None:
            continue
        x, weight, bias, fan_in_fan_out = parts
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or weight.target not in graph_tensors:
            continue
        tensor = graph_tensors[weight.target]
        if id(tensor) not in by_id or tensor.dim() != 2:
            continue
        key = _site_key(node, tensor, by_id[id(tensor)], model)
        in_f, out_f = (tensor.shape[0], tensor.shape[1]) if fan_in_fan_out else (tensor.shape[1], tensor.shape[0])
        bias_path = None
        if isinstance(bias, fx.Node) and bias.op == "get_attr":
            bias_tensor = graph_tensors.get(cast(str, bias.target))  # a get_attr target is a path
            bias_path = by_id.get(id(bias_tensor)) if bias_tensor is not None else None
        sites.append(LinearSite(node, key, by_id[id(tensor)], x, int(in_f), int(out_f), fan_in_fan_out, bias_path))
    return sites


def _site_key(node: fx.Node, weight: torch.Tensor, weight_name: str, model: torch.nn.Module) -> str:
    path = module_path(node)
    try:
        owner = model.get_submodule(path) if path else None
    except AttributeError:
        owner = None
    if owner is not None:
        for pname, p in owner.named_parameters(recurse=False):
            if p is weight:
                return path if pname == "weight" else f"{path}.{pname}"
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def output_head_path(model: torch.nn.Module) -> Optional[str]:
    """The module path of an HF model's output embedding (all-linear leaves it alone, as PEFT does)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


# -- PEFT matching rules ---------------------------------------------------------------------------


def _matches_name_list(key: str, names) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def is_excluded(key: str, config: LoraConfig, modules_to_save: list[str]) -> bool:
    excl = config.exclude_modules
    if excl:
        if isinstance(excl, str) and re.fullmatch(excl, key):
            return True
        if not isinstance(excl, str) and _matches_name_list(key, excl):
            return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save)


def layer_index(key: str, layers_pattern) -> Optional[int]:
    """The first numbered path segment after a layers container (PEFT's layers_to_transform rule)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_target(key: str, config: LoraConfig, targets, modules_to_save: list[str], head: Optional[str]) -> bool:
    """PEFT's check_target_module_exists, with `all-linear` resolved against the output head."""
    if is_excluded(key, config, modules_to_save):
        return False
    if targets == ALL_LINEAR:
        return key != head
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    indexes = getattr(config, "layers_to_transform", None)
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    idx = layer_index(key, getattr(config, "layers_pattern", None))
    if idx is None:
        return False
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: first pattern matching a suffix of the key."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def resolve_targets(
    sites: list[LinearSite],
    config: Any,
    model: torch.nn.Module,
    defaults: Mapping[str, Union[list[str], str]] = DEFAULT_LORA_TARGETS,
) -> list[LinearSite]:
    """The sites an adapter adapts (one per key), or a TargetNotFoundError naming the nearest paths.
    `defaults`: the method's target modules by model type, for target_modules=None (PEFT's tables)."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ConfigError(
                f"target_modules is not set and peftfx has no default for model type {model_type!r}; "
                "set target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'."
            )
        targets = defaults[str(model_type)]
    head = output_head_path(model)
    modules_to_save = config.resolved_modules_to_save()
    chosen: dict[str, LinearSite] = {}
    for site in sites:
        if site.key not in chosen and is_target(site.key, config, targets, modules_to_save, head):
            chosen[site.key] = site
    if not chosen:
        raise TargetNotFoundError(_no_match_message(targets, config, sites, model))
    return list(chosen.values())


def _no_match_message(targets, config: LoraConfig, sites: list[LinearSite], model: torch.nn.Module) -> str:
    keys = sorted({s.key for s in sites})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    names = sorted({k.rsplit(".", 1)[-1] for k in keys})
    close: list[str] = []
    for want in wanted:
        close += difflib.get_close_matches(want, names, n=3, cutoff=0.3)
        close += difflib.get_close_matches(want, keys, n=3, cutoff=0.3)
    close = list(dict.fromkeys(close)) or keys[:8]
    hint = ""
    if getattr(config, "layers_to_transform", None) is not None:
        hint = f" (layers_to_transform={config.layers_to_transform!r} may exclude every layer)"
    return (
        f"target_modules={targets!r} matched no linear op in {type(model).__name__}{hint}. "
        f"Closest module paths: {close}. Linear ops found: {len(keys)}; "
        "use one of these names, a regex, or 'all-linear'."
    )


def resolve_rank(site: LinearSite, config: LoraConfig) -> tuple[int, float]:
    r = pattern_value(config.rank_pattern, site.key, config.r)
    alpha = pattern_value(config.alpha_pattern, site.key, config.lora_alpha)
    limit = min(site.in_features, site.out_features)
    if r > limit:
        raise ConfigError(
            f"rank r={r} is larger than layer {site.key!r} allows ({site.in_features} in, "
            f"{site.out_features} out, so at most {limit}); lower r or use rank_pattern for this layer."
        )
    return r, alpha


def annotate(gm: fx.GraphModule, model: torch.nn.Module) -> dict[str, fx.Node]:
    """Write each linear site's key onto its node (plain data) and return key -> node."""
    found: dict[str, fx.Node] = {}
    for site in linear_sites(gm, model):
        mark_site(site.node, Site(site.key, site.weight_path, site.fan_in_fan_out))
        found.setdefault(site.key, site.node)
    return found
