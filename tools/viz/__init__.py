"""`peftfx.visualize`: draw where every adapter went.

    peftfx.visualize(pm, "graph.svg")                 # .svg .png .pdf .dot .html, by extension
    peftfx.visualize(pm, "diff.html", diff=True)      # base vs adapted: added / removed / rewired
    peftfx.visualize(pm, "overview.png", depth=3)     # collapse modules below model.layers.<i>

The pieces, one module each: source (which graphs), graph (fx graph -> nodes/edges with module paths
and provenance), fold (repeated blocks), view (what is drawn), dot (graphviz), html (page); docs
redraws the pictures in docs/visualizer.md. `peftfx viz` is in peftfx.tools.cli.viz.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

from torch import fx

from peftfx.errors import ConfigError

from .dot import render, to_dot
from .graph import diff_graphs, read_graph
from .html import page
from .source import graphs, summaries
from .view import build_view

FORMATS = ("svg", "png", "pdf", "dot", "html")


def visualize(
    model: Any,
    path: str,
    *,
    depth: Optional[int] = None,
    diff: bool = False,
    fold: bool = True,
    base: Optional[fx.GraphModule] = None,
    details: bool = False,
    title: Optional[str] = None,
    dpi: Optional[int] = None,
) -> str:
    """Draw a PeftFxModel's active graph (or any fx.GraphModule) to `path`; the format follows the
    extension (.svg, .png, .pdf, .dot, .html). Returns `path`.

    depth: draw each module whose path has `depth` components (3 = model.layers.0) as one box.
    diff: mark nodes added / removed / rewired against the base graph (`base=` for a GraphModule).
    fold: draw repeated identical blocks once, with a "layers 1–31 same as layer 0" note.
    details: also draw base parameter reads (otherwise listed in the reading op's tooltip) and shape
        queries (sym_size).
    dpi: resolution of .png output.
    """
    fmt = os.path.splitext(str(path))[1].lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(
            f"cannot tell the format of {str(path)!r}; end the file name with one of "
            f"{', '.join('.' + f for f in FORMATS)}."
        )
    adapted_gm, base_gm = graphs(model, diff, base)
    adapted = read_graph(adapted_gm, details)
    panel = summaries(model, adapted_gm, adapted)
    graph = diff_graphs(read_graph(base_gm, details), adapted) if base_gm is not None else adapted
    view = build_view(graph, fold=fold, depth=depth, diff=diff)
    title = title if title is not None else _default_title(model, diff)
    dot = to_dot(view, title)
    if fmt == "dot":
        data = dot.source.encode()
    elif fmt == "html":
        data = page(render(dot, "svg").decode(), view, panel, title).encode()
    else:
        data = render(dot, fmt, dpi=dpi if fmt == "png" else None)
    write_atomic(str(path), data)
    return str(path)


def _default_title(model: Any, diff: bool) -> str:
    base = getattr(model, "base_model", None)
    name = type(base).__name__ if base is not None else type(model).__name__
    active = getattr(model, "active_adapters", None)
    text = name + (f" · adapters: {', '.join(active)}" if active else "")
    return text + (" · diff against the base graph" if diff else "")


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".viz-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
