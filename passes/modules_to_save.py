"""modules_to_save: read a module's parameters from the adapter's trainable copy instead of the base.

PEFT wraps such a module (a classifier head, say) and runs a per-adapter copy. In a graph the module is
just the get_attr nodes of its tensors, so the pass retargets those nodes to the copy in the store.
"""

from __future__ import annotations

from torch import fx

from peftfx.rewrite import ATTR, MOUNT, Builder, Captures, Pass, PassContext, Rule, read_tensor, store_path

NAME = "modules_to_save"


def _copy_targets(ctx: PassContext) -> dict[int, tuple[str, str]]:
    """id(base tensor) -> (adapter, get_attr target of its copy); the first active adapter saving it wins."""
    if "saved_targets" not in ctx.scratch:
        targets: dict[int, tuple[str, str]] = {}
        for adapter in reversed(ctx.saved):
            for path in ctx.store.saved.get(adapter, {}):
                original = ctx.model.get_submodule(path)
                prefix = ctx.store.saved_module_path(path, adapter)
                for name, tensor in list(original.named_parameters()) + list(original.named_buffers()):
                    targets[id(tensor)] = (adapter, store_path(f"{prefix}.{name}"))
        ctx.scratch["saved_targets"] = targets
    return ctx.scratch["saved_targets"]


def _reads_saved_module(node: fx.Node, ctx: PassContext):
    """A base tensor read (not one of the store's) of a module an active adapter keeps a copy of;
    captures the adapter and the copy's target."""
    tensor = read_tensor(node)
    if tensor is None or str(node.target).startswith(f"{MOUNT}."):
        return None
    copy = _copy_targets(ctx).get(id(tensor))
    return None if copy is None else {"adapter": copy[0], "copy": copy[1]}


def _retarget(b: Builder, ctx: PassContext, m: Captures) -> None:
    b.adapter = m["adapter"]
    b.retarget(m["node"], m["copy"])


PASS = Pass(
    NAME,
    rules=(Rule("retarget", ATTR(where=_reads_saved_module), _retarget),),
    applies=lambda ctx: bool(ctx.saved),
)
