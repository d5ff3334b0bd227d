"""The one mechanism every pass uses: a rule table run over the graph, and a builder that inserts nodes.

A pass is a tuple of `Rule(name, match, apply)`. The runner visits each node once (a snapshot of the
node list, so inserted nodes are not revisited), calls `apply` with a `Builder` anchored at the node,
then cleans up (dead code, lint, recompile) if anything changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import fx

from .select import META_KEY

PORTED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


@dataclass(frozen=True)
class Rule:
    """A pattern (`match(node, ctx) -> bool`) and the handler that rewrites a matching node."""

    name: str
    match: Callable[[fx.Node, Any], bool]
    apply: Callable[[fx.Node, Any, "Builder"], None]


class Builder:
    """Inserts nodes after an anchor in program order, porting the anchor's metadata and stamping
    provenance (`meta["peftfx"] = {"pass": ..., "adapter": ...}`) so tools can tell what was added."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, pass_name: str):
        self.gm = gm
        self.anchor = anchor
        self.pass_name = pass_name
        self.adapter: Optional[str] = None
        self._cursor = anchor
        self.created: list[fx.Node] = []

    def _stamp(self, node: fx.Node) -> fx.Node:
        for key in PORTED_META:
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        node.meta[META_KEY] = {"pass": self.pass_name, "adapter": self.adapter, "anchor": self.anchor.name}
        self._cursor = node
        self.created.append(node)
        return node

    def continue_after(self, node: fx.Node) -> None:
        """Insert the next nodes after `node` (e.g. `anchor.prev`, for nodes that feed the anchor)."""
        self._cursor = node

    def get_attr(self, target: str) -> fx.Node:
        with self.gm.graph.inserting_after(self._cursor):
            return self._stamp(self.gm.graph.get_attr(target))

    def call(self, op: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        with self.gm.graph.inserting_after(self._cursor):
            return self._stamp(self.gm.graph.call_function(op, args, kwargs))

    def replace_uses(self, old: fx.Node, new: fx.Node) -> None:
        """Point every user of `old` at `new`, except the nodes this builder created from `old`."""
        mine = set(self.created)
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in mine)


def read_tensor(node: Any) -> Optional[torch.Tensor]:
    """The tensor a `get_attr` node reads from its graph's module (None for any other node)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value: Any = node.graph.owning_module
    for part in node.target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def run_pass(gm: fx.GraphModule, rules: tuple[Rule, ...], ctx: Any, pass_name: str) -> int:
    """Apply the first matching rule to each node; return how many nodes were rewritten."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        for rule in rules:
            if rule.match(node, ctx):
                rule.apply(node, ctx, Builder(gm, node, f"{pass_name}.{rule.name}"))
                rewritten += 1
                break
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return rewritten
