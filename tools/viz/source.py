"""Where the visualizer's graphs come from: a PeftFxModel (its active variant, and for `diff` the base
graph of the same capture) or a plain fx.GraphModule; plus the facts the side panel lists per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, cast

import torch
from torch import fx

from peftfx.errors import ConfigError

from .graph import VizGraph


@dataclass
class AdapterSummary:
    name: str
    kind: str  # "LORA", "PREFIX_TUNING", ... or the passes that inserted its nodes
    parameters: int
    targets: list[str]  # module paths where its nodes sit (LoRA: the adapted linear layers)
    state: str = "active"  # "active", "merged" (folded into weights, no nodes) or "inactive"
    passes: list[str] = field(default_factory=list)


def _is_peftfx_model(obj: Any) -> bool:
    from peftfx.model import PeftFxModel

    return isinstance(obj, PeftFxModel)


def graphs(obj: Any, diff: bool, base: Optional[fx.GraphModule]) -> tuple[fx.GraphModule, Optional[fx.GraphModule]]:
    """(graph to draw, base graph to compare with when `diff`)."""
    if _is_peftfx_model(obj):
        adapted = obj.graph_module
        return adapted, (base if base is not None else base_graph(obj)) if diff else None
    if isinstance(obj, fx.GraphModule):
        if diff and base is None:
            raise ConfigError(
                "diff=True on a GraphModule needs base=<the graph before the passes>; or pass the "
                "PeftFxModel itself, which knows its base graph."
            )
        return obj, base if diff else None
    raise ConfigError(f"visualize() draws a PeftFxModel or a torch.fx.GraphModule; got {type(obj).__name__}.")


def base_graph(pm: Any) -> fx.GraphModule:
    """The base variant of the capture that `pm.graph_module` was built from, so node names match.

    Prompt and prefix variants are rewritten from their own capture (with inputs_embeds / position_ids),
    not the plain one, so their base is that capture's. `disable_adapter()` is not used: it would
    unmerge merged adapters as a side effect.
    """
    return pm.state.base_graph_for(training=pm.training)


def summaries(obj: Any, gm: fx.GraphModule, graph: VizGraph) -> list[AdapterSummary]:
    """One entry per adapter: those drawn in the graph first, then (for a PeftFxModel) the others."""
    targets: dict[str, list[str]] = {}
    passes: dict[str, list[str]] = {}
    for node in graph.nodes.values():
        if node.adapter is not None:
            targets.setdefault(node.adapter, [])
            if node.module not in targets[node.adapter]:
                targets[node.adapter].append(node.module)
            if node.pass_name not in passes.setdefault(node.adapter, []):
                passes[node.adapter].append(cast(str, node.pass_name))  # set on every node with an adapter
    out = []
    if _is_peftfx_model(obj):
        store = obj.adapters
        for name in list(targets) + [n for n in store.adapter_names() if n not in targets]:
            state = "active" if name in targets else ("merged" if name in obj.merged_adapters else "inactive")
            site_targets = targets.get(name) or list(store.sites.get(name, {}))
            count = sum(p.numel() for _, p in store.adapter_parameters(name))
            out.append(
                AdapterSummary(name, store.kinds.get(name, "?"), count, site_targets, state, passes.get(name, []))
            )
        return out
    for name in targets:
        out.append(
            AdapterSummary(
                name, ", ".join(passes[name]), _graph_parameters(gm, graph, name), targets[name], "active", passes[name]
            )
        )
    return out


def _graph_parameters(gm: fx.GraphModule, graph: VizGraph, adapter: str) -> int:
    """Elements of the distinct parameters an adapter's get_attr nodes read (no PeftFxModel at hand)."""
    seen: dict[int, int] = {}
    for node in graph.nodes.values():
        if node.adapter == adapter and node.op == "get_attr":
            try:
                value = gm.get_parameter(node.target)
            except AttributeError:
                continue
            if isinstance(value, torch.nn.Parameter):
                seen[id(value)] = value.numel()
    return sum(seen.values())
