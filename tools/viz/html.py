"""The `.html` output: one self-contained page (inline SVG, CSS and JS; nothing fetched) with pan/zoom,
a search box over module paths that highlights matching boxes, and a side panel listing the adapters,
their targets and parameter counts.

The search also runs from the URL: `page.html#search=q_proj` opens with q_proj's boxes highlighted (the
browser test uses this). The page records the result as `data-hits` on <body>.
"""

from __future__ import annotations

import html
import json
import re
from typing import Optional

from .dot import STATUS_STYLE, STATUS_TEXT, adapter_colors, css_name
from .source import AdapterSummary
from .view import View

_CSS = """
html, body { margin: 0; height: 100%; font: 13px/1.4 Helvetica, Arial, sans-serif; color: #222; }
body { display: flex; flex-direction: column; }
header { display: flex; gap: 12px; align-items: center; padding: 6px 10px; border-bottom: 1px solid #ddd;
         background: #fafafa; }
header h1 { font-size: 15px; margin: 0; font-weight: 600; }
#search { width: 320px; padding: 4px 6px; }
#hits { color: #666; }
main { flex: 1; display: flex; min-height: 0; }
#canvas { flex: 1; overflow: hidden; cursor: grab; background: #fff; }
#canvas.dragging { cursor: grabbing; }
#canvas svg { width: 100%; height: 100%; }
aside { width: 340px; overflow: auto; border-left: 1px solid #ddd; padding: 8px 12px; background: #fcfcfc; }
aside h2 { font-size: 14px; margin: 10px 0 4px; }
.adapter-card { border: 1px solid #ddd; border-radius: 6px; padding: 6px 8px; margin: 6px 0; background: #fff; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px; vertical-align: middle;
          margin-right: 6px; border: 1px solid #555; }
.adapter-card ul { margin: 4px 0 0 18px; padding: 0; max-height: 160px; overflow: auto; }
.muted { color: #777; }
button { font-size: 12px; }
svg.searching g.node:not(.hit), svg.searching g.cluster:not(.hit) { opacity: 0.25; }
g.node.hit polygon, g.node.hit ellipse, g.node.hit path { stroke: #e6007e !important; stroke-width: 3px; }
g.cluster.hit > polygon, g.cluster.hit > g > a > polygon { stroke: #e6007e !important; stroke-width: 2px; }
"""

_JS = r"""
(function () {
  const info = JSON.parse(document.getElementById('peftfx-data').textContent);
  const svg = document.querySelector('#canvas svg');
  const input = document.getElementById('search');
  const hitsLabel = document.getElementById('hits');
  const nodes = Array.from(svg.querySelectorAll('g.node'));
  const clusters = Array.from(svg.querySelectorAll('g.cluster'));
  // --- pan and zoom: change the viewBox --------------------------------------------------------------
  const full = svg.viewBox.baseVal;
  let box = {x: full.x, y: full.y, w: full.width, h: full.height};
  const home = Object.assign({}, box);
  function apply() { svg.setAttribute('viewBox', `${box.x} ${box.y} ${box.w} ${box.h}`); }
  function toSvg(ev) {
    const r = svg.getBoundingClientRect();
    const s = Math.max(box.w / r.width, box.h / r.height);
    const ox = (r.width * s - box.w) / 2, oy = (r.height * s - box.h) / 2;
    return {x: box.x - ox + (ev.clientX - r.left) * s, y: box.y - oy + (ev.clientY - r.top) * s, s: s};
  }
  svg.addEventListener('wheel', function (ev) {
    ev.preventDefault();
    const p = toSvg(ev), f = ev.deltaY > 0 ? 1.15 : 1 / 1.15;
    box = {x: p.x - (p.x - box.x) * f, y: p.y - (p.y - box.y) * f, w: box.w * f, h: box.h * f};
    apply();
  }, {passive: false});
  let drag = null;
  svg.addEventListener('mousedown', function (ev) { drag = toSvg(ev); svg.parentNode.classList.add('dragging'); });
  window.addEventListener('mouseup', function () { drag = null; svg.parentNode.classList.remove('dragging'); });
  window.addEventListener('mousemove', function (ev) {
    if (!drag) return;
    const p = toSvg(ev);
    box.x -= p.x - drag.x; box.y -= p.y - drag.y; apply();
  });
  document.getElementById('fit').addEventListener('click', function () { box = Object.assign({}, home); apply(); });
  function zoomTo(el) {
    const b = el.getBBox();
    const pad = Math.max(b.width, b.height) * 0.6 + 40;
    box = {x: b.x - pad, y: b.y - pad, w: b.width + 2 * pad, h: b.height + 2 * pad};
    const t = el.closest('g.graph').transform.baseVal.consolidate();
    if (t) { box.x += t.matrix.e; box.y += t.matrix.f; }
    apply();
  }
  // --- search over module paths ----------------------------------------------------------------------
  function matches(id, q) {
    const item = info.items[id];
    if (!item) return false;
    return item.modules.some(function (m) { return m.toLowerCase().includes(q); }) ||
           item.nodes.some(function (n) { return n.toLowerCase() === q; });
  }
  function search(text) {
    const q = text.trim().toLowerCase();
    let hits = 0, first = null;
    nodes.forEach(function (g) {
      const hit = q !== '' && matches(g.id, q);
      g.classList.toggle('hit', hit);
      if (hit) { hits += 1; first = first || g; }
    });
    clusters.forEach(function (g) {
      const path = g.id.startsWith('c-') ? g.id.slice(2).toLowerCase() : '';
      g.classList.toggle('hit', q !== '' && path.includes(q));
    });
    svg.classList.toggle('searching', q !== '');
    hitsLabel.textContent = q === '' ? '' : hits + (hits === 1 ? ' box' : ' boxes');
    document.body.setAttribute('data-hits', String(hits));
    document.body.setAttribute('data-query', q);
    return first;
  }
  input.addEventListener('input', function () { search(input.value); });
  input.addEventListener('keydown', function (ev) {
    if (ev.key === 'Enter') { const first = search(input.value); if (first) zoomTo(first); }
  });
  const m = /(?:^#|[#&?])search=([^&]*)/.exec(location.hash || '') || /[?&]search=([^&]*)/.exec(location.search);
  if (m) { input.value = decodeURIComponent(m[1]); search(input.value); }
  document.body.setAttribute('data-ready', '1');
})();
"""


def _svg_element(svg_text: str) -> str:
    """dot's SVG without its XML prolog and doctype, for inlining."""
    start = svg_text.find("<svg")
    return re.sub(r"<!--.*?-->\s*", "", svg_text[start:], flags=re.S)


def _panel(view: View, adapters: list[AdapterSummary]) -> str:
    colors = adapter_colors(view.adapters)
    parts = ["<h2>Adapters</h2>"]
    if not adapters:
        parts.append('<p class="muted">No adapter nodes in this graph.</p>')
    for a in adapters:
        color = colors.get(a.name)
        swatch = f'<span class="swatch" style="background:{color}"></span>' if color else ""
        targets = "".join(f"<li>{html.escape(t or '(top level)')}</li>" for t in a.targets)
        passes = f" · passes: {html.escape(', '.join(a.passes))}" if a.passes else ""
        parts.append(
            f'<div class="adapter-card" id="panel-adapter-{css_name(a.name)}" data-adapter="{html.escape(a.name)}" '
            f'data-parameters="{a.parameters}">{swatch}<b>{html.escape(a.name)}</b> '
            f'<span class="muted">{html.escape(a.kind)} · {a.state}</span><br>'
            f"{a.parameters:,} parameters{passes}<br>{len(a.targets)} target module(s):"
            f'<ul class="targets">{targets}</ul></div>'
        )
    if view.folds:
        parts.append("<h2>Folded repeats</h2><ul>")
        parts += [f"<li>{html.escape(f.container)}: {html.escape(f.text())}</li>" for f in view.folds]
        parts.append("</ul>")
    if view.diff:
        parts.append("<h2>Diff</h2><ul>")
        counts: dict[str, int] = {}
        for item in view.items.values():
            counts[item.status] = counts.get(item.status, 0) + 1
        for status, (fill, _, _) in STATUS_STYLE.items():
            parts.append(
                f'<li><span class="swatch" style="background:{fill}"></span>{STATUS_TEXT[status]}: '
                f"{counts.get(status, 0)} boxes</li>"
            )
        parts.append("</ul>")
    parts.append(
        '<h2>How to</h2><p class="muted">Scroll to zoom, drag to pan; hover a box for its op, module, '
        "pass and adapter. Type a module path (e.g. <code>layers.0.self_attn</code>) to highlight it; "
        "Enter zooms to the first match. Open with <code>#search=q_proj</code> to search at load.</p>"
    )
    return "\n".join(parts)


def page(svg_text: str, view: View, adapters: list[AdapterSummary], title: Optional[str]) -> str:
    """The whole page as text."""
    data = {
        "items": {
            i.id: {
                "kind": i.kind,
                "modules": i.modules,
                "nodes": i.nodes,
                "adapters": i.adapters,
                "passes": i.passes,
                "status": i.status,
            }
            for i in view.items.values()
        },
        "adapters": [a.__dict__ for a in adapters],
    }
    blob = json.dumps(data).replace("</", "<\\/")
    heading = html.escape(title or "peftfx graph")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{heading}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>{heading}</h1>
<input id="search" type="search" placeholder="search module paths, e.g. layers.0.self_attn.q_proj" autocomplete="off">
<span id="hits"></span><button id="fit" type="button">fit</button></header>
<main><div id="canvas">{_svg_element(svg_text)}</div>
<aside id="panel">{_panel(view, adapters)}</aside></main>
<script type="application/json" id="peftfx-data">{blob}</script>
<script>{_JS}</script>
</body></html>
"""
