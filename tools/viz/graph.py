"""The visualizer's graph model: an fx graph read into plain nodes and edges, with module paths,
adapter provenance and (for `--diff`) each node's status against the base graph.

Everything downstream (folding, dot, html) reads only this model, so it is the one place that knows
about fx node metadata: `nn_module_stack` gives the module path, `meta["peftfx"]` (stamped by
`peftfx.rewrite.Builder`) gives the pass and adapter of an inserted node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from torch import fx

from peftfx.rewrite.annotations import provenance_of

ADDED, REMOVED, REWIRED, UNCHANGED = "added", "removed", "rewired", "unchanged"
# Side-effect-only checks that export leaves in the graph; they say nothing about the model.
_NOISE_OPS = ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range", "_assert_async")


@dataclass
class VizNode:
    """One drawable graph node."""

    name: str  # the fx node name, unique within a graph (and shared by base and variant graphs)
    op: str  # fx opcode: placeholder, get_attr, call_function, output, ...
    label: str  # short text drawn in the box
    target: str  # full target (e.g. aten.linear.default or a parameter path)
    module: str  # module path ("" = top level)
    module_class: str  # class name of that module, when known
    adapter: Optional[str] = None  # adapter of a node a pass inserted
    pass_name: Optional[str] = None  # "<pass>.<rule>" that inserted it
    shape: Optional[str] = None
    status: str = UNCHANGED
    reads: list[str] = field(default_factory=list)  # hidden parameter inputs (e.g. a linear's weight)
    ident: str = ""  # identity across graphs of one capture (see read_graph)

    @property
    def inserted(self) -> bool:
        return self.pass_name is not None

    def tooltip(self) -> str:
        lines = [
            f"node: {self.name}",
            f"op: {self.target}",
            f"module: {self.module or '(top level)'}" + (f" ({self.module_class})" if self.module_class else ""),
        ]
        if self.shape:
            lines.append(f"shape: {self.shape}")
        lines += [f"reads: {r}" for r in self.reads]
        if self.pass_name:
            lines += [f"pass: {self.pass_name}", f"adapter: {self.adapter}"]
        if self.status != UNCHANGED:
            lines.append(f"diff: {self.status}")
        return "\n".join(lines)


@dataclass
class VizGraph:
    """Nodes in program order and data-flow edges (producer name, consumer name)."""

    nodes: dict[str, VizNode]
    edges: list[tuple[str, str]]
    module_classes: dict[str, str]

    def adapters(self) -> list[str]:
        """Adapters with nodes in the graph, in order of first appearance."""
        seen: dict[str, None] = {}
        for n in self.nodes.values():
            if n.adapter is not None:
                seen.setdefault(n.adapter)
        return list(seen)


def module_of(node: fx.Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module a node ran in; ("", "") at top level."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    if not isinstance(path, str) or path.startswith("_empty_nn_module_stack"):
        return "", ""
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


def _stamp(node: fx.Node) -> dict:
    """Who made a node (empty for nodes export recorded): pass ("<pass>.<rule>"), adapter, anchor."""
    made = provenance_of(node)
    return {} if made is None else {"pass": made.qualified, "adapter": made.adapter, "anchor": made.anchor}


def _hidden(node: fx.Node, details: bool) -> bool:
    """Left out of the drawing unless `details`: base parameter reads (listed in the tooltip of the op
    that reads them) and shape queries (`sym_size`). Adapter nodes always stay: they are the point.
    Shape assertions are never drawn."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if any(name.startswith(noise) for noise in _NOISE_OPS):
            return True
        return not details and name.startswith("sym_size") and not _stamp(node)
    return node.op == "get_attr" and not details and not _stamp(node)


def _target_text(node: fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        text = str(target)
        if not text.startswith("aten.") and hasattr(target, "__name__"):
            text = f"{getattr(target, '__module__', '') or ''}.{target.__name__}".lstrip(".")
        return text
    return str(node.target)


def _label(node: fx.Node) -> str:
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0] if name.count(".") == 1 else name
    if node.op == "get_attr":
        parts = str(node.target).split(".")
        return ".".join(parts[-2:]) if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]
    if node.op == "output":
        return "output"
    return str(node.target)


def _shape(node: fx.Node) -> Optional[str]:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    dtype = str(getattr(val, "dtype", "")).replace("torch.", "")
    return f"{dtype}[{', '.join(str(d) for d in shape)}]"


def read_graph(gm: fx.GraphModule, details: bool = False) -> VizGraph:
    """The drawable part of `gm`'s graph."""
    classes: dict[str, str] = {}
    for node in gm.graph.nodes:
        path, cls = module_of(node)
        if path and cls:
            classes.setdefault(path, cls)
    nodes: dict[str, VizNode] = {}
    hidden = {n.name for n in gm.graph.nodes if _hidden(n, details)}
    inserted: dict[tuple, int] = {}
    for node in gm.graph.nodes:
        if node.name in hidden:
            continue
        path, cls = module_of(node)
        if node.op == "get_attr" and not path:  # a base parameter: its owner is its path's parent
            path = str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else ""
            cls = classes.get(path, "")
        stamp = _stamp(node)
        ident = node.name
        if stamp:  # inserted nodes are named by who made them: names shift with what else a variant inserted
            key = (stamp.get("pass"), stamp.get("adapter"), stamp.get("anchor"))
            inserted[key] = inserted.get(key, -1) + 1
            ident = f"{key[0]}/{key[1]}@{key[2]}#{inserted[key]}"
        nodes[node.name] = VizNode(
            name=node.name,
            op=node.op,
            label=_label(node),
            target=_target_text(node),
            module=path,
            module_class=cls or classes.get(path, ""),
            adapter=stamp.get("adapter"),
            pass_name=stamp.get("pass"),
            shape=_shape(node),
            reads=[str(i.target) for i in node.all_input_nodes if i.name in hidden],
            ident=ident,
        )
    edges = [(i.name, n.name) for n in gm.graph.nodes if n.name in nodes for i in n.all_input_nodes if i.name in nodes]
    return VizGraph(nodes=nodes, edges=list(dict.fromkeys(edges)), module_classes=classes)


def diff_graphs(base: VizGraph, adapted: VizGraph) -> VizGraph:
    """The adapted graph plus the base nodes it lost, each node marked added / removed / rewired
    (same node, other inputs) / unchanged.

    A variant graph is a copy of its capture's graph, so a node it kept has the same name in the base
    graph. Nodes a pass inserted in both (e.g. quantize) are matched by (pass, adapter, anchor, order)."""
    base_by_ident = {n.ident: n for n in base.nodes.values()}
    adapted_by_ident = {n.ident: n for n in adapted.nodes.values()}

    def inputs(graph: VizGraph) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for src, dst in graph.edges:
            out.setdefault(dst, []).append(graph.nodes[src].ident)
        return out

    inputs_base, inputs_adapted = inputs(base), inputs(adapted)
    nodes: dict[str, VizNode] = {}
    for name, node in adapted.nodes.items():
        twin = base_by_ident.get(node.ident)
        if twin is None:
            node.status = ADDED
        elif inputs_adapted.get(name, []) != inputs_base.get(twin.name, []):
            node.status = REWIRED
        nodes[name] = node
    renamed: dict[str, str] = {}  # base node name -> its key in the result
    for node in list(base.nodes.values()):
        twin = adapted_by_ident.get(node.ident)
        if twin is not None:
            renamed[node.name] = twin.name
            continue
        key = node.name if node.name not in adapted.nodes else f"base.{node.name}"
        renamed[node.name] = key
        nodes[key] = dataclasses.replace(node, status=REMOVED, name=key)
    lost = [
        (renamed[s], renamed[d])
        for s, d in base.edges
        if REMOVED in (nodes[renamed[s]].status, nodes[renamed[d]].status)
    ]
    classes = {**base.module_classes, **adapted.module_classes}
    return VizGraph(nodes=nodes, edges=list(dict.fromkeys(list(adapted.edges) + lost)), module_classes=classes)
