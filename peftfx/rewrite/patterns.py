"""Node patterns with named captures (after tinygrad's UPat and inductor's pattern matcher).

A pattern describes a node: its kind, its target(s), patterns for its leading arguments and a
predicate. `match(node)` returns the captures (a dict of name -> node or value) or None, so a handler
receives the nodes it needs by name instead of walking the graph again.

    P(aten.mul.Tensor, P(aten.linear.default, ANY("h"), ATTR("weight"), name="product"), ATTR("scale"))

matches `mul(linear(h, weight), scale)` with `weight`/`scale` read by get_attr and captures h, weight,
product and scale (the root is always captured as "node"). A `where(node, ctx)` predicate sees the pass
context (which adapters the variant serves); returning a dict adds those facts to the captures.
Patterns that a fixed shape cannot describe (a path of variable length) are functions wrapped in `Match`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

from torch import fx

Captures = dict[str, Any]


class Pattern:
    """Base class: `match` returns captures or None; `targets` lets the runner skip other nodes."""

    targets: Optional[frozenset[Any]] = None  # the node targets this pattern can match (None: any)

    def match(self, node: Any, ctx: Any = None) -> Optional[Captures]:
        """The captures (the root under "node") if `node` matches, else None."""
        captures: Captures = {"node": node}
        return captures if self._match(node, captures, ctx) else None

    def _match(self, value: Any, captures: Captures, ctx: Any) -> bool:
        raise NotImplementedError


Where = Callable[[fx.Node, Any], Any]  # (node, ctx) -> falsy | True | extra captures


def _check(where: Optional[Where], node: Any, captures: Captures, ctx: Any) -> bool:
    if where is None:
        return True
    verdict = where(node, ctx)
    if isinstance(verdict, dict):
        captures.update(verdict)
        return True
    return bool(verdict)


class P(Pattern):
    """A node of kind `op` (default call_function) whose target is one of `target`, whose first
    arguments match `args` (patterns or literal values; a shorter tuple checks a prefix), whose keyword
    arguments match `kwargs`, and for which `where(node, ctx)` holds."""

    def __init__(
        self,
        target: Union[Any, Iterable[Any], None] = None,
        *args: Any,
        op: Optional[str] = "call_function",
        name: Optional[str] = None,
        kwargs: Optional[dict[str, Any]] = None,
        where: Optional[Where] = None,
        nargs: Optional[int] = None,
    ) -> None:
        if target is None or isinstance(target, (str,)) or not isinstance(target, (tuple, list, set, frozenset)):
            self.targets = None if target is None else frozenset([target])
        else:
            self.targets = frozenset(target)
        self.op, self.args, self.name, self.where, self.nargs = op, args, name, where, nargs
        self.kwargs = kwargs or {}

    def _match(self, value: Any, captures: Captures, ctx: Any) -> bool:
        if not isinstance(value, fx.Node) or (self.op is not None and value.op != self.op):
            return False
        if self.targets is not None and value.target not in self.targets:
            return False
        if len(value.args) < len(self.args) or (self.nargs is not None and len(value.args) != self.nargs):
            return False
        for pattern, arg in zip(self.args, value.args):
            if not _match_value(pattern, arg, captures, ctx):
                return False
        for key, pattern in self.kwargs.items():
            if not _match_value(pattern, value.kwargs.get(key), captures, ctx):
                return False
        if self.name is not None:
            if self.name in captures and captures[self.name] is not value:
                return False
            captures[self.name] = value
        return _check(self.where, value, captures, ctx)


class ANY(Pattern):
    """Any value (node or constant), captured under `name` if given."""

    def __init__(self, name: Optional[str] = None, where: Optional[Where] = None) -> None:
        self.name, self.where = name, where

    def _match(self, value: Any, captures: Captures, ctx: Any) -> bool:
        if not _check(self.where, value, captures, ctx):
            return False
        if self.name is not None:
            captures[self.name] = value
        return True


def ATTR(name: Optional[str] = None, where: Optional[Where] = None) -> P:
    """A get_attr node (a parameter or buffer the graph reads)."""
    return P(None, op="get_attr", name=name, where=where)


def INPUT(input_name: str, name: Optional[str] = None, where: Optional[Where] = None) -> P:
    """The placeholder of the graph input called `input_name`."""
    return P(input_name, op="placeholder", name=name, where=where)


class Match(Pattern):
    """A pattern written as a function `(node, ctx) -> captures | None`, for shapes P cannot spell (paths
    of any length); `targets` still restricts which nodes it is tried on."""

    def __init__(
        self, fn: Callable[[fx.Node, Any], Optional[Captures]], targets: Optional[Iterable[Any]] = None
    ) -> None:
        self.fn = fn
        self.targets = frozenset(targets) if targets is not None else None

    def _match(self, value: Any, captures: Captures, ctx: Any) -> bool:
        if not isinstance(value, fx.Node):
            return False
        found = self.fn(value, ctx)
        if found is None:
            return False
        captures.update(found)
        return True


def _match_value(pattern: Any, value: Any, captures: Captures, ctx: Any) -> bool:
    if isinstance(pattern, Pattern):
        return pattern._match(value, captures, ctx)
    return bool(pattern == value) and type(pattern) is type(value)
