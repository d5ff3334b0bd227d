"""The Builder: every graph edit a pass makes goes through it.

It inserts nodes after a cursor in program order, ports the anchor's metadata (module path, stack trace)
and stamps provenance (`annotations.Provenance`) on what it creates or retargets, so the visualizer and
tests can tell what each pass added. Passes that only restructure what export recorded (inline_grad_regions,
simplify: `Pass(provenance=False)`) stamp nothing, so a drawn graph shows the model's own nodes as such;
editing an existing node's arguments never stamps it (the node is still the model's). Direct
`node.args = ...` or `graph.erase_node` in a pass bypass the stamping and the bookkeeping; the Builder has
a method for each edit passes need.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import fx

from .annotations import META_KEY, Provenance, stamp

PORTED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


class Builder:
    """Edits one graph for one rule application, anchored at the matched node."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, pass_name: str, rule: str, stamps: bool = True) -> None:
        self.gm = gm
        self.anchor = anchor
        self.pass_name = pass_name
        self.rule = rule
        self.stamps = stamps
        self.adapter: Optional[str] = None
        self._cursor = anchor
        self.created: list[fx.Node] = []

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def _stamp(self, node: fx.Node) -> fx.Node:
        for key in PORTED_META:
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        if self.stamps:
            stamp(node, Provenance(self.pass_name, self.rule, self.adapter, self.anchor.name))
        self._cursor = node
        self.created.append(node)
        return node

    # -- where new nodes go ---------------------------------------------------------------------------

    def continue_after(self, node: fx.Node) -> None:
        """Insert the next nodes after `node` (e.g. `anchor.prev`, for nodes that feed the anchor)."""
        self._cursor = node

    def insert_before(self, node: fx.Node) -> None:
        """Insert the next nodes just before `node`."""
        self._cursor = node.prev

    def at(self, anchor: fx.Node, adapter: Optional[str] = None) -> "Builder":
        """Take metadata (module path) and provenance's anchor from another node, keeping the cursor."""
        self.anchor, self.adapter = anchor, adapter
        return self

    # -- creating nodes -------------------------------------------------------------------------------

    def get_attr(self, target: str) -> fx.Node:
        with self.graph.inserting_after(self._cursor):
            return self._stamp(self.graph.get_attr(target))

    def call(self, op: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_after(self._cursor):
            return self._stamp(self.graph.call_function(op, args, kwargs))

    def copy(self, node: fx.Node, arg_map: Callable[[fx.Node], Any]) -> fx.Node:
        """A copy of a node from another graph (an inlined region), its inputs mapped by `arg_map`;
        keeps the original's metadata."""
        with self.graph.inserting_after(self._cursor):
            new = self.graph.node_copy(node, arg_map)
        self._cursor = new
        self.created.append(new)
        return new

    def take_meta(self, node: fx.Node, source: fx.Node) -> fx.Node:
        """Give a created node everything export recorded on `source` (its value, module path): for a
        node standing in for `source` (inline_grad_regions' detach for the getitem it replaces)."""
        node.meta.update({k: v for k, v in source.meta.items() if k != META_KEY})
        return node

    # -- changing nodes -------------------------------------------------------------------------------

    def replace_uses(self, old: fx.Node, new: fx.Node) -> None:
        """Point every user of `old` at `new`, except the nodes this builder created from `old`."""
        mine = set(self.created)
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in mine)

    def set_args(
        self, node: fx.Node, args: Optional[tuple[Any, ...]] = None, kwargs: Optional[dict[str, Any]] = None
    ) -> None:
        """Change a node's arguments in place (its users are unchanged)."""
        if args is not None:
            node.args = args
        if kwargs is not None:
            node.kwargs = kwargs

    def set_arg(self, node: fx.Node, index: int, value: Any) -> None:
        self.set_args(node, tuple(value if i == index else a for i, a in enumerate(node.args)))

    def retarget(self, node: fx.Node, target: str) -> None:
        """Make a get_attr node read another attribute."""
        node.target = target
        if self.stamps:
            stamp(node, Provenance(self.pass_name, self.rule, self.adapter, node.name))

    def erase(self, node: fx.Node) -> None:
        """Remove a node that nothing reads any more (dead-code elimination keeps impure ones, dropout)."""
        self.graph.erase_node(node)

    def drop_submodule(self, name: str) -> None:
        """Delete a submodule the graph no longer calls (an inlined region's body)."""
        delattr(self.gm, name)


def read_tensor(node: Any) -> Optional[torch.Tensor]:
    """The tensor a `get_attr` node reads from its graph's module (None for any other node)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value: Any = node.graph.owning_module
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None
