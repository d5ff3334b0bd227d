"""What gets drawn: the graph model reduced to boxes in nested module clusters.

Three reductions keep a real model readable: repeated blocks fold into one note (fold.py), modules
deeper than `depth` collapse into one box each, and a module holding a single box is not drawn as a
cluster of its own (the box names it instead). Edges follow data flow between the remaining boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, cast

from peftfx.errors import ConfigError

from .fold import Fold, find_folds
from .graph import REWIRED, UNCHANGED, VizGraph, VizNode


@dataclass
class Item:
    """One drawn box: a graph node, a collapsed module, or a fold note."""

    id: str  # element id in the SVG
    kind: str  # "op", "module" or "fold"
    label: str
    cluster: str  # module path of the cluster it is drawn in ("" = top level)
    tooltip: str
    op: str = ""  # fx opcode of an op box (placeholder / output get their own shapes)
    adapters: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    status: str = UNCHANGED
    modules: list[str] = field(default_factory=list)  # module paths it stands for (search matches these)
    nodes: list[str] = field(default_factory=list)  # fx node names it stands for


@dataclass
class View:
    items: dict[str, Item]
    edges: list[tuple[str, str]]
    clusters: dict[str, str]  # module path -> class name, for every cluster drawn
    folds: list[Fold]
    adapters: list[str]  # adapters in the graph, in order (legend order and colours)
    diff: bool


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _aggregate_status(nodes: list[VizNode]) -> str:
    statuses = {n.status for n in nodes}
    if len(statuses) == 1:
        return statuses.pop()
    return UNCHANGED if statuses == {UNCHANGED} else REWIRED


def _fold_of(module: str, member_folds: dict[str, Fold]) -> Optional[Fold]:
    parts = module.split(".") if module else []
    for k in range(1, len(parts) + 1):
        fold = member_folds.get(".".join(parts[:k]))
        if fold is not None:
            return fold
    return None


def build_view(graph: VizGraph, fold: bool = True, depth: Optional[int] = None, diff: bool = False) -> View:
    """Boxes, clusters and edges for `graph`. With `depth`, each module whose path has `depth` components
    (1 = `model`, 3 = `model.layers.0`) is drawn as one box holding everything inside it."""
    if depth is not None and depth < 1:
        raise ConfigError(
            f"depth={depth}: give 1 or more (module path components kept, e.g. 3 for "
            "model.layers.0), or None to draw every module."
        )
    folds = find_folds(graph) if fold else []
    member_folds = {p: f for f in folds for p in f.member_paths()}
    owner: dict[str, str] = {}  # node name -> item id
    grouped: dict[str, list[VizNode]] = {}
    items: dict[str, Item] = {}
    for node in graph.nodes.values():
        folded = _fold_of(node.module, member_folds) if member_folds else None
        parts = node.module.split(".") if node.module else []
        container_depth = len(folded.container.split(".")) if folded and folded.container else 0
        if folded is not None and (depth is None or depth > container_depth):
            key = folded.id
        elif depth is not None and len(parts) >= depth:
            key = "m-" + ".".join(parts[:depth])
        else:
            key = "n-" + node.name
            items[key] = Item(
                id=key,
                kind="op",
                label=node.label,
                cluster=node.module,
                tooltip=node.tooltip(),
                op=node.op,
                adapters=[node.adapter] if node.adapter else [],
                passes=[node.pass_name] if node.pass_name else [],
                status=node.status,
                modules=[node.module],
                nodes=[node.name],
            )
        owner[node.name] = key
        grouped.setdefault(key, []).append(node)
    for f in folds:
        if f.id in grouped:
            items[f.id] = _fold_item(f, grouped[f.id])
    for key, nodes in grouped.items():
        if key.startswith("m-"):
            items[key] = _module_item(key[2:], nodes, graph.module_classes, depth)
    edges = list(dict.fromkeys((owner[s], owner[d]) for s, d in graph.edges if owner[s] != owner[d]))
    clusters = _clusters(items, graph.module_classes)
    return View(
        items=items,
        edges=edges,
        clusters=clusters,
        folds=[f for f in folds if f.id in items],
        adapters=graph.adapters(),
        diff=diff,
    )


def _summary(nodes: list[VizNode]) -> tuple[list[str], list[str], str]:
    adapters = list(dict.fromkeys(n.adapter for n in nodes if n.adapter))
    passes = list(dict.fromkeys(n.pass_name for n in nodes if n.pass_name))
    # a node with an adapter was inserted by a pass, so it has a pass_name
    lines = [
        f"adapter: {a} ({', '.join(dict.fromkeys(cast(str, n.pass_name) for n in nodes if n.adapter == a))})"
        for a in adapters
    ]
    return adapters, passes, "\n".join(lines)


def _fold_item(fold: Fold, nodes: list[VizNode]) -> Item:
    adapters, passes, lines = _summary(nodes)
    tooltip = (
        f"{fold.text()}\n{', '.join(fold.member_paths())}: structurally identical to "
        f"{fold.path(fold.kept)} (same ops, wiring and adapters), not drawn again."
    )
    return Item(
        id=fold.id,
        kind="fold",
        label=fold.text(),
        cluster=fold.container,
        tooltip=tooltip + ("\n" + lines if lines else ""),
        adapters=adapters,
        passes=passes,
        status=_aggregate_status(nodes),
        modules=list(dict.fromkeys(n.module for n in nodes)),
        nodes=[n.name for n in nodes],
    )


def _module_item(path: str, nodes: list[VizNode], classes: dict[str, str], depth: Optional[int]) -> Item:
    adapters, passes, lines = _summary(nodes)
    cls = classes.get(path, "")
    name = path.rsplit(".", 1)[-1]
    label = f"{name}\\n{cls}" if cls else name
    label += f"\\n{len(nodes)} ops" + (
        f", {len(adapters)} adapter" + ("s" if len(adapters) > 1 else "") if adapters else ""
    )
    tooltip = f"{path}" + (f" ({cls})" if cls else "") + f": {len(nodes)} ops, collapsed at depth {depth}"
    return Item(
        id="m-" + path,
        kind="module",
        label=label,
        cluster=_parent(path),
        tooltip=tooltip + ("\n" + lines if lines else ""),
        adapters=adapters,
        passes=passes,
        status=_aggregate_status(nodes),
        modules=sorted({n.module for n in nodes}),
        nodes=[n.name for n in nodes],
    )


def _clusters(items: dict[str, Item], classes: dict[str, str]) -> dict[str, str]:
    """Every module path that holds a box, with its ancestors; a cluster that would hold exactly one
    box and nothing else is dropped and the box moves up, labelled with the module's name."""

    def ancestry(path: str) -> list[str]:
        parts = path.split(".") if path else []
        return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]

    while True:
        boxes: dict[str, int] = {}
        children: dict[str, set[str]] = {}
        for item in items.values():
            boxes[item.cluster] = boxes.get(item.cluster, 0) + 1
            for path in ancestry(item.cluster):
                children.setdefault(_parent(path), set()).add(path)
        lonely = [p for p, n in boxes.items() if p and n == 1 and not children.get(p)]
        if not lonely:
            break
        for item in items.values():
            if item.cluster in lonely:
                name = item.cluster.rsplit(".", 1)[-1]
                item.label = f"{item.label}\\n{name}" if item.kind == "op" else item.label
                item.cluster = _parent(item.cluster)
    paths = {p for item in items.values() for p in ancestry(item.cluster)}
    return {p: classes.get(p, "") for p in sorted(paths)}
