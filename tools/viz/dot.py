"""Dot rendering: a View as a graphviz graph (nested module clusters, adapter colours, legend), and
running graphviz's `dot` program on it.

Each box gets an SVG id (`n-<node>`, `m-<module>`, `f-<block>`) and classes (`adapter-<name>`,
`status-<diff status>`, `fold`, `legend`) so that tests and the HTML page can find things in the SVG.
"""

from __future__ import annotations

import re
import subprocess
from typing import Optional

import graphviz

from peftfx.errors import GraphvizNotFoundError, PeftFxError

from .graph import ADDED, REMOVED, REWIRED, UNCHANGED
from .view import Item, View

# Colour-blind-friendly (Tableau 10) fills, one per adapter in order of appearance.
ADAPTER_COLORS = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
STATUS_STYLE = {  # diff mode: fill, border, font
    ADDED: ("#2ca02c", "#1a6e1a", "#ffffff"),
    REMOVED: ("#d62728", "#8c1a1a", "#ffffff"),
    REWIRED: ("#ffffff", "#ff9900", "#333333"),
    UNCHANGED: ("#eeeeee", "#cccccc", "#9a9a9a"),
}
STATUS_TEXT = {ADDED: "added", REMOVED: "removed", REWIRED: "rewired (inputs changed)", UNCHANGED: "unchanged"}
BASE_STYLE = ("#ffffff", "#9a9a9a", "#333333")
PASS_STYLE = ("#d9d2f0", "#6a5acd", "#222222")  # inserted by a pass for no adapter (e.g. quantize)
SHAPES = {"placeholder": "invhouse", "output": "house", "get_attr": "cylinder"}
# Above this many boxes dot's crossing minimisation and network simplex dominate (an unfolded 32-layer
# Llama, ~2,400 boxes: over 10 minutes); capped, it takes ~20 s with a slightly less tidy layout.
LARGE_GRAPH = 600
LARGE_GRAPH_LIMITS = {"nslimit": "0.1", "nslimit1": "0.1", "mclimit": "0.05"}


def css_name(name: str) -> str:
    """An adapter name as a CSS class fragment."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def adapter_colors(adapters: list[str]) -> dict[str, str]:
    return {a: ADAPTER_COLORS[i % len(ADAPTER_COLORS)] for i, a in enumerate(adapters)}


def _text(value: str) -> str:
    """A plain string for a dot attribute: backslashes kept literal, newlines as dot's `\\n`, and never
    mistaken for an HTML-like label (the graphviz package treats `<...>` as one)."""
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    return value + " " if value.startswith("<") and value.endswith(">") else value


def _style(item: Item, view: View, colors: dict[str, str]) -> dict[str, str]:
    classes = [item.kind] + [f"adapter adapter-{css_name(a)}" for a in item.adapters[:1]]
    classes += [f"adapter-{css_name(a)}" for a in item.adapters[1:]]
    if view.diff:
        classes.append(f"status-{item.status}")
        fill, border, font = STATUS_STYLE[item.status]
    elif item.adapters:
        fill, border, font = colors[item.adapters[0]], "#333333", "#ffffff"
    elif item.passes:
        fill, border, font = PASS_STYLE
        classes.append("pass-only")
    else:
        fill, border, font = BASE_STYLE
    attrs = {
        "id": item.id,
        "class": " ".join(classes),
        "tooltip": _text(item.tooltip),
        "label": item.label,
        "fillcolor": fill,
        "color": border,
        "fontcolor": font,
        "style": "rounded,filled",
    }
    if view.diff and item.adapters:  # keep the adapter visible in diff mode: a thick border in its colour
        attrs.update(color=colors[item.adapters[0]], penwidth="2.5")
    if item.status == REMOVED:
        attrs["style"] = "rounded,filled,dashed"
    if item.kind == "fold":
        attrs.update(
            shape="note",
            style="filled",
            fillcolor="#fff5cc" if not view.diff else fill,
            fontcolor="#333333" if not view.diff else font,
            fontsize="11",
        )
    elif item.kind == "module":
        attrs.update(shape="box", penwidth="1.5", fontsize="10")
    elif item.op in SHAPES:
        attrs.update(shape=SHAPES[item.op], style="filled" + (",dashed" if item.status == REMOVED else ""))
    return attrs


def to_dot(view: View, title: Optional[str] = None) -> graphviz.Digraph:
    """The graphviz graph of a view, with a legend for adapters (or diff statuses)."""
    colors = adapter_colors(view.adapters)
    dot = graphviz.Digraph(
        "peftfx",
        graph_attr={
            "rankdir": "TB",
            "fontname": "Helvetica",
            "nodesep": "0.15",
            "ranksep": "0.22",
            "newrank": "true",
            "label": _text(title or ""),
            "labelloc": "t",
            "fontsize": "14",
            "tooltip": _text(title or "graph"),
        },
    )
    dot.attr("node", shape="box", fontname="Helvetica", fontsize="9", height="0.22", margin="0.06,0.02")
    dot.attr("edge", color="#8a8a8a", arrowsize="0.5", penwidth="0.8")
    if len(view.items) > LARGE_GRAPH:
        dot.graph_attr.update(LARGE_GRAPH_LIMITS)
    by_cluster: dict[str, list[Item]] = {}
    for item in view.items.values():
        by_cluster.setdefault(item.cluster, []).append(item)
    children: dict[str, list[str]] = {}
    for path in view.clusters:
        children.setdefault(path.rsplit(".", 1)[0] if "." in path else "", []).append(path)

    def fill(graph: graphviz.Digraph, path: str) -> None:
        for item in by_cluster.get(path, []):
            graph.node(item.id, **_style(item, view, colors))
        for child in children.get(path, []):
            with graph.subgraph(name=f"cluster_{child}") as sub:
                cls = view.clusters[child]
                name = child.rsplit(".", 1)[-1]
                sub.attr(
                    label=f"{name} ({cls})" if cls else name,
                    id=f"c-{child}",
                    tooltip=_text(child),
                    style="rounded",
                    color="#bbbbbb",
                    fontcolor="#555555",
                    fontsize="10",
                    labeljust="l",
                    **{"class": "module-cluster"},
                )
                fill(sub, child)

    fill(dot, "")
    status = {item.id: item.status for item in view.items.values()}
    for src, dst in view.edges:
        attrs = {}
        if view.diff and REMOVED in (status[src], status[dst]):
            attrs = {"style": "dashed", "color": STATUS_STYLE[REMOVED][0]}
        elif view.diff and ADDED in (status[src], status[dst]):
            attrs = {"color": STATUS_STYLE[ADDED][0]}
        dot.edge(src, dst, **attrs)
    _legend(dot, view, colors)
    return dot


def _legend(dot: graphviz.Digraph, view: View, colors: dict[str, str]) -> None:
    entries = []
    if view.diff:
        for s in (ADDED, REMOVED, REWIRED, UNCHANGED):
            fill, border, font = STATUS_STYLE[s]
            entries.append((f"legend-{s}", f"legend status-{s}", STATUS_TEXT[s], fill, border, font))
    for adapter in view.adapters:
        entries.append(
            (
                f"legend-adapter-{css_name(adapter)}",
                f"legend adapter-{css_name(adapter)}",
                f"adapter {adapter}",
                colors[adapter],
                "#333333",
                "#ffffff",
            )
        )
    if not view.diff and any(i.passes and not i.adapters for i in view.items.values()):
        fill, border, font = PASS_STYLE
        passes = sorted({p.split(".")[0] for i in view.items.values() if not i.adapters for p in i.passes})
        entries.append(
            (
                "legend-pass-only",
                "legend pass-only",
                f"inserted by {', '.join(passes)} (no adapter)",
                fill,
                border,
                font,
            )
        )
    if view.folds:
        entries.append(("legend-fold", "legend legend-fold", "folded repeats", "#fff5cc", "#999999", "#333333"))
    if not entries:
        return
    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(label="legend", id="legend", style="rounded", color="#bbbbbb", fontsize="10", **{"class": "legend"})
        previous = None
        for node_id, classes, label, fill, border, font in entries:
            legend.node(
                node_id,
                label=_text(label),
                id=node_id,
                fillcolor=fill,
                color=border,
                fontcolor=font,
                style="rounded,filled" + (",dashed" if "removed" in node_id else ""),
                tooltip=_text(label),
                **{"class": classes},
            )
            if previous is not None:
                legend.edge(previous, node_id, style="invis")
            previous = node_id


def render(dot: graphviz.Digraph, fmt: str, dpi: Optional[int] = None) -> bytes:
    """Run `dot` to produce svg, png or pdf bytes; a clear error when the program is missing."""
    if dpi is not None:
        dot = dot.copy()
        dot.attr(dpi=str(dpi))
    try:
        return dot.pipe(format=fmt, engine="dot")
    except graphviz.ExecutableNotFound as exc:
        raise GraphvizNotFoundError(
            "drawing .svg/.png/.pdf/.html needs graphviz's `dot` program, which is not installed (or not on "
            "PATH). Install it with `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` "
            "(macOS) or `conda install graphviz`; or write a .dot file, which needs no program."
        ) from exc
    except (graphviz.CalledProcessError, subprocess.CalledProcessError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        raise PeftFxError(f"graphviz `dot -T{fmt}` failed: {stderr.decode(errors='replace').strip()}") from exc
