"""modules_to_save: read a module's parameters from the adapter's trainable copy instead of the base.

PEFT wraps such a module (a classifier head, say) and runs a per-adapter copy. In a graph the module is
just the get_attr nodes of its tensors, so the pass retargets those nodes to the copy in the store.
"""
from __future__ import annotations

from torch import fx

from peftfx.adapters import MOUNT
from peftfx.rewrite import Builder, Rule
from peftfx.select import META_KEY

from .context import PassContext

NAME = "modules_to_save"


def _copy_targets(ctx: PassContext) -> dict[int, tuple[str, str]]:
    """id(base tensor) -> (adapter, store path of its copy); the first active adapter saving it wins."""
    if "saved_targets" not in ctx.scratch:
        targets: dict[int, tuple[str, str]] = {}
        for adapter in reversed(ctx.saved):
            for path in ctx.store.saved.get(adapter, {}):
                original = ctx.model.get_submodule(path)
                prefix = ctx.store.saved_module_path(path, adapter)
                for name, tensor in list(original.named_parameters()) + list(original.named_buffers()):
                    targets[id(tensor)] = (adapter, f"{MOUNT}.{prefix}.{name}")
        ctx.scratch["saved_targets"] = targets
    return ctx.scratch["saved_targets"]


def _attr_value(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _reads_saved_module(node: fx.Node, ctx: PassContext) -> bool:
    if node.op != "get_attr" or node.target.startswith(f"{MOUNT}."):
        return False
    return id(_attr_value(node.graph.owning_module, node.target)) in _copy_targets(ctx)


def _retarget(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    tensor = _attr_value(node.graph.owning_module, node.target)
    adapter, node.target = _copy_targets(ctx)[id(tensor)]
    node.meta[META_KEY] = {"pass": b.pass_name, "adapter": adapter, "anchor": node.name}


RULES = (Rule("retarget", _reads_saved_module, _retarget),)
