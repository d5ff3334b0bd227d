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
from typing import Any, Optional

from torch import fx

from peftfx.errors import ConfigError
from peftfx.progress import get_logger, timed
from peftfx.save_store import atomic_write

from .dot import render, to_dot
from .graph import diff_graphs, read_graph
from .html import page
from .source import graphs, summaries
from .view import build_view

FORMATS = ("svg", "png", "pdf", "dot", "html")
log = get_logger("viz")


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
    fmt = output_format(path)
    adapted_gm, base_gm = graphs(model, diff, base)
    adapted = read_graph(adapted_gm, details)
    panel = summaries(model, adapted_gm, adapted)
    graph = diff_graphs(read_graph(base_gm, details), adapted) if base_gm is not None else adapted
    view = build_view(graph, fold=fold, depth=depth, diff=diff)
    title = title if title is not None else _default_title(model, diff)
    dot = to_dot(view, title)
    if fmt == "dot":
        data = dot.source.encode()
    else:
        with timed(log, f"laying out {path} with graphviz dot"):  # seconds for a large model's graph
            if fmt == "html":
                data = page(render(dot, "svg").decode(), view, panel, title).encode()
            else:
                data = render(dot, fmt, dpi=dpi if fmt == "png" else None)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return atomic_write(str(path), data)


def output_format(path: str) -> str:
    """The format a drawing at `path` gets, from its extension; ConfigError for one it cannot write
    (checked before anything is loaded or captured)."""
    fmt = os.path.splitext(str(path))[1].lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(
            f"cannot tell the format of {str(path)!r}; end the file name with one of "
            f"{', '.join('.' + f for f in FORMATS)}."
        )
    return fmt


def _default_title(model: Any, diff: bool) -> str:
    base = getattr(model, "base_model", None)
    name = type(base).__name__ if base is not None else type(model).__name__
    active = getattr(model, "active_adapters", None)
    text = name + (f" · adapters: {', '.join(active)}" if active else "")
    return text + (" · diff against the base graph" if diff else "")
