"""Passes as tables of rules, and the runner.

A `Pass` says once when it applies to a variant (`applies(ctx)`), checks once whether it can
(`validate(gm, ctx)`, which raises a clear error before any node changed), and holds rules
`Rule(name, pattern, handler)`. The runner visits each node once in program order (a snapshot, so
inserted nodes are not revisited), tries only the rules whose pattern can match that node's target,
calls the first matching rule's `handler(b, ctx, captures)` with a Builder anchored at the node, and
cleans up (dead code, lint, recompile) if anything changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import fx

from .builder import Builder
from .patterns import Captures, Pattern


@dataclass(frozen=True)
class Rule:
    """A pattern and the handler that rewrites what it matched."""

    name: str
    pattern: Pattern
    handler: Callable[[Builder, Any, Captures], None]


def _always(ctx: Any) -> bool:
    return True


@dataclass(frozen=True)
class Pass:
    """A named table of rules, with when it applies and what it checks first."""

    name: str
    rules: tuple[Rule, ...]
    applies: Callable[[Any], bool] = _always
    validate: Optional[Callable[[fx.GraphModule, Any], None]] = None
    provenance: bool = True  # stamp what it makes (False: it only restructures what export recorded)

    def rule(self, name: str) -> Rule:
        return next(r for r in self.rules if r.name == name)


def run_pass(gm: fx.GraphModule, graph_pass: Pass, ctx: Any) -> int:
    """Validate, then apply the first matching rule to each node; return how many nodes were rewritten."""
    if not graph_pass.applies(ctx):
        return 0
    if graph_pass.validate is not None:
        graph_pass.validate(gm, ctx)
    by_target: dict[Any, list[Rule]] = {}
    anywhere = [r for r in graph_pass.rules if r.pattern.targets is None]
    for r in graph_pass.rules:
        for target in r.pattern.targets or ():
            by_target.setdefault(target, []).append(r)
    order = {r: i for i, r in enumerate(graph_pass.rules)}
    rewritten = 0
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):  # erased by an earlier rule
            continue
        candidates = by_target.get(node.target, []) if _hashable(node.target) else []
        if anywhere:
            candidates = sorted(candidates + anywhere, key=order.__getitem__)
        for r in candidates:
            captures = r.pattern.match(node, ctx)
            if captures is not None:
                r.handler(Builder(gm, node, graph_pass.name, r.name, graph_pass.provenance), ctx, captures)
                rewritten += 1
                break
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return rewritten


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True
