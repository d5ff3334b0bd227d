"""The graph visualizer: what the drawings say is checked against the graphs and against HF PEFT.

Drawings are parsed back (SVG with xml.etree, the HTML page after a real headless Chromium ran its
script) and compared with independent facts: which modules PEFT adapted, how many LoRA parameters PEFT
holds, which nodes exist in the adapted graph but not in the graph `disable_adapter()` runs.
"""
from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import peft
import pytest
import torch

import peftfx
from conftest import CONFIGS
from oracle import twin_models
from peftfx.errors import GraphvizNotFoundError
from peftfx.rewrite import made_by, provenance_of
from peftfx.tools import cli
from peftfx.tools.viz import visualize
from peftfx.tools.viz.fold import parse_ranges

SVG = "{http://www.w3.org/2000/svg}"
XLINK = "{http://www.w3.org/1999/xlink}"
LAYERS = 3  # tiny Llama of conftest
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="graphviz `dot` is not installed (apt-get install graphviz)")


# -- reading drawings back ---------------------------------------------------------------------------

@dataclass
class Box:
    id: str
    classes: set
    tooltip: dict  # "key: value" lines of the tooltip
    fill: str
    stroke: str
    text: str

    @property
    def module(self) -> str:
        module = self.tooltip.get("module", "").split(" (")[0]
        return "" if module == "(top level)" else module


def _tooltip(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out.setdefault(key, value)
    return out


def boxes(svg_root: ET.Element) -> dict[str, Box]:
    """Every drawn node of a graphviz SVG by id, with its classes, tooltip, colours and text."""
    out = {}
    for g in svg_root.iter(f"{SVG}g"):
        classes = set(g.get("class", "").split())
        if "node" not in classes:
            continue
        link = g.find(f".//{SVG}a")
        tip = link.get(f"{XLINK}title", "") if link is not None else ""
        shape = next(e for e in g.iter() if e.tag in (f"{SVG}polygon", f"{SVG}path", f"{SVG}ellipse"))
        text = " ".join(t.text or "" for t in g.iter(f"{SVG}text"))
        out[g.get("id")] = Box(g.get("id"), classes, _tooltip(tip), shape.get("fill"), shape.get("stroke"), text)
    return out


def draw_svg(obj, tmp_path, name: str = "g.svg", **options) -> dict[str, Box]:
    path = visualize(obj, str(tmp_path / name), **options)
    return boxes(ET.parse(path).getroot())


def adapter_boxes(drawn: dict[str, Box], adapter: str = "default") -> list[Box]:
    """Drawn graph nodes of one adapter (not its legend entry, fold notes or collapsed modules)."""
    return [b for b in drawn.values() if f"adapter-{adapter}" in b.classes and "op" in b.classes]


def peft_adapted_modules(ref, adapter: str = "default") -> set[str]:
    """Module paths HF PEFT put a LoRA layer on, in the base model's naming."""
    return {name.removeprefix("base_model.model.") for name, m in ref.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.lora_A}


def peft_lora_parameters(ref, adapter: str = "default") -> int:
    return sum(p.numel() for n, p in ref.named_parameters() if "lora_" in n and f".{adapter}." in n)


def stamped(gm) -> set[str]:
    return {n.name for n in gm.graph.nodes if provenance_of(n) is not None}


# -- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def twins(model_dirs, tmp_path_factory):
    """(PEFT model, peftfx model) with LoRA 'default' on q/v and 'b' on k/o, same weights."""
    cls = CONFIGS["llama"][0]
    configs = {"default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
               "b": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"])}
    ref, pm = twin_models(lambda name: cls.from_pretrained(model_dirs[name]).eval(), "llama", configs,
                          tmp_path_factory.mktemp("viz-twins"))
    return ref, pm


@pytest.fixture(scope="module")
def prefix_pm(model_dirs):
    model = CONFIGS["llama"][0].from_pretrained(model_dirs["llama"]).eval()
    return peftfx.apply(model, peftfx.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


# -- SVG -------------------------------------------------------------------------------------------------

# per module, the adapter nodes drawn: the lora pass's path, and what passes/fuse.py makes of it
UNFUSED_OPS = ["A", "B", "scaling", "linear", "linear", "mul", "add"]  # reads, A and B, scale, add into y
FUSED_OPS = ["A", "B", "scaling", "slice", "mul", "linear", "add"]  # A's view of the group matmul, B * scaling
FUSED_FIRST = ["cat", "linear"]  # q and v share x: the one A matmul is drawn with the first site, q_proj


@needs_dot
@pytest.mark.parametrize("fusion", [False, True])
def test_every_adapted_module_has_its_adapter_nodes(twins, tmp_path, fusion):
    ref, pm = twins
    pm.set_adapter("default")
    pm.fusion = fusion
    try:
        drawn = draw_svg(pm, tmp_path, fold=False)
        lora = adapter_boxes(drawn)
        assert {b.module for b in lora} == peft_adapted_modules(ref, "default")
        for module in peft_adapted_modules(ref, "default"):
            mine = [b for b in lora if b.module == module]
            ops = sorted(b.text.split()[0] for b in mine)
            if not fusion:
                assert ops == sorted(UNFUSED_OPS)
                assert all(b.tooltip["pass"] == "lora.linear" for b in mine)
            else:
                first = module.endswith("q_proj")
                assert ops == sorted(FUSED_OPS + (FUSED_FIRST if first else []))
                assert all(b.tooltip["pass"].startswith(("lora.", "fuse.")) for b in mine)
            assert all(b.tooltip["adapter"] == "default" for b in mine)
        assert {b.id[2:] for b in lora} == stamped(pm.graph_module)
    finally:
        pm.fusion = True


@needs_dot
def test_adapter_colours_match_the_legend(twins, tmp_path):
    ref, pm = twins
    pm.set_adapter(["default", "b"])
    try:
        drawn = draw_svg(pm, tmp_path, fold=False)
    finally:
        pm.set_adapter("default")
    fills = {}
    for adapter in ("default", "b"):
        legend = drawn[f"legend-adapter-{adapter}"]
        mine = adapter_boxes(drawn, adapter)
        assert {b.module for b in mine} == peft_adapted_modules(ref, adapter)
        assert {b.fill for b in mine} == {legend.fill}
        fills[adapter] = legend.fill
    assert fills["default"] != fills["b"]
    plain = [b for b in drawn.values() if not {"adapter", "legend"} & b.classes]
    assert plain and not {b.fill for b in plain} & set(fills.values())


@needs_dot
def test_repeated_layers_fold_into_one_note_with_the_right_range(twins, tmp_path):
    _, pm = twins
    pm.set_adapter("default")
    drawn = draw_svg(pm, tmp_path)
    folds = [b for b in drawn.values() if "fold" in b.classes]
    assert len(folds) == 1
    words = folds[0].text.split(" same as ")
    assert words[0].startswith("layers ") and words[1] == "layer 0"
    assert parse_ranges(words[0].removeprefix("layers ")) == list(range(1, LAYERS))
    modules = {b.module for b in drawn.values() if b.module.startswith("model.layers.")}
    assert modules and all(m.startswith("model.layers.0.") or m == "model.layers.0" for m in modules)
    assert {b.module for b in adapter_boxes(drawn)} == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    assert "adapter-default" in folds[0].classes
    assert folds[0].tooltip["adapter"] == "default (fuse.shared_input, lora.linear, fuse.fold_scaling)"


@needs_dot
def test_only_structurally_identical_layers_fold(model_dirs, tmp_path):
    model = CONFIGS["llama"][0].from_pretrained(model_dirs["llama"]).eval()
    pm = peftfx.apply(model, peftfx.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 2]))
    drawn = draw_svg(pm, tmp_path)
    folds = [b.text for b in drawn.values() if "fold" in b.classes]
    assert folds == ["layer 2 same as layer 0"]
    drawn_layers = {b.module.split(".")[2] for b in drawn.values() if b.module.startswith("model.layers.")}
    assert drawn_layers == {"0", "1"}  # layer 1 has no adapter: drawn, not folded


@needs_dot
def test_diff_marks_exactly_the_inserted_nodes(twins, tmp_path):
    _, pm = twins
    pm.set_adapter("default")
    adapted = pm.graph_module
    with pm.disable_adapter():
        base = pm.graph_module
    drawn = draw_svg(pm, tmp_path, diff=True, fold=False)
    added = {b.id[2:] for b in drawn.values() if "status-added" in b.classes and "legend" not in b.classes}
    new_names = {n.name for n in adapted.graph.nodes} - {n.name for n in base.graph.nodes}
    assert added == stamped(adapted) == new_names
    assert not [b for b in drawn.values() if "status-removed" in b.classes and "legend" not in b.classes]
    # the ops that read a LoRA output instead of the linear's are the rewired ones
    rewired = {b.id[2:] for b in drawn.values() if "status-rewired" in b.classes and "legend" not in b.classes}
    assert rewired == {u.name for n in adapted.graph.nodes if n.name in stamped(adapted) for u in n.users
                       if u.name not in stamped(adapted)}
    legend = {s: drawn[f"legend-{s}"].fill for s in ("added", "removed", "unchanged")}
    assert len(set(legend.values())) == 3
    for b in drawn.values():
        for status, fill in legend.items():
            if f"status-{status}" in b.classes:
                assert b.fill == fill, b.id


@needs_dot
def test_prefix_tuning_nodes_in_every_attention_layer(prefix_pm, tmp_path):
    pm = prefix_pm
    drawn = draw_svg(pm, tmp_path, fold=False)
    prefix = adapter_boxes(drawn)
    attention = {f"model.layers.{i}.self_attn" for i in range(LAYERS)}
    assert {b.module for b in prefix} - {""} == attention
    assert {b.tooltip["pass"] for b in prefix} == {"prefix.positions", "prefix.attention"}
    for layer in attention:  # keys and values: one cat each in front of the layer's own
        assert sum(b.text.split()[0] == "cat" for b in prefix if b.module == layer) >= 2
    assert {b.id[2:] for b in prefix} == stamped(pm.graph_module)


@needs_dot
def test_prefix_diff_shows_the_dropped_position_input(prefix_pm, tmp_path):
    drawn = draw_svg(prefix_pm, tmp_path, diff=True, fold=False)
    removed = [b for b in drawn.values() if "status-removed" in b.classes and "legend" not in b.classes]
    assert [b.id for b in removed] == ["n-position_ids"]
    attention_ops = [b for b in drawn.values() if b.text.startswith("scaled_dot_product_attention")]
    assert len(attention_ops) == LAYERS and all("status-rewired" in b.classes for b in attention_ops)


@needs_dot
def test_qlora_quantize_nodes_are_base_not_adapter_in_the_diff(model_dirs, tmp_path):
    pytest.importorskip("bitsandbytes")
    if not hasattr(peftfx, "QuantConfig"):
        pytest.skip("this checkout has no quantization yet")
    model = CONFIGS["llama"][0].from_pretrained(model_dirs["llama"]).eval()
    pm = peftfx.apply(model, peftfx.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                      quantization=peftfx.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    gm = pm.graph_module
    lora = {n.name for n in gm.graph.nodes if made_by(n, "lora") or made_by(n, "fuse")}
    quant = {n.name for n in gm.graph.nodes if made_by(n, "quantize")}
    assert lora and quant
    drawn = draw_svg(pm, tmp_path, fold=False)
    pass_only = {b.id[2:] for b in drawn.values() if "pass-only" in b.classes and "legend" not in b.classes}
    assert pass_only == quant
    assert {drawn[f"n-{n}"].fill for n in quant} == {drawn["legend-pass-only"].fill}
    # the base graph has the quantize nodes too (under other names): the diff adds only LoRA's
    diffed = draw_svg(pm, tmp_path, "diff.svg", diff=True, fold=False)
    added = {b.id[2:] for b in diffed.values() if "status-added" in b.classes and "legend" not in b.classes}
    assert added == lora
    assert not [b for b in diffed.values() if "status-removed" in b.classes and "legend" not in b.classes]


@needs_dot
def test_depth_collapses_modules_into_boxes(twins, tmp_path):
    _, pm = twins
    pm.set_adapter("default")
    drawn = draw_svg(pm, tmp_path, depth=3)
    ops = [b for b in drawn.values() if "op" in b.classes]
    assert ops and all(len(b.module.split(".")) < 3 for b in ops if b.module)
    layer0 = drawn["m-model.layers.0"]
    assert "module" in layer0.classes and "adapter-default" in layer0.classes
    assert [b.text for b in drawn.values() if "fold" in b.classes] == ["layers 1–2 same as layer 0"]
    coarse = draw_svg(pm, tmp_path, "coarse.svg", depth=2)
    assert "m-model.layers" in coarse and not [b for b in coarse.values() if "fold" in b.classes]
    with pytest.raises(peftfx.ConfigError, match="depth=0"):
        visualize(pm, str(tmp_path / "x.svg"), depth=0)


@needs_dot
def test_graph_module_input_and_binary_formats(twins, tmp_path):
    ref, pm = twins
    pm.set_adapter("default")
    gm = pm.graph_module
    drawn = draw_svg(gm, tmp_path, fold=False)
    assert {b.module for b in adapter_boxes(drawn)} == peft_adapted_modules(ref)
    magic = {"png": b"\x89PNG", "pdf": b"%PDF"}
    for fmt, head in magic.items():
        with open(visualize(pm, str(tmp_path / f"g.{fmt}")), "rb") as f:
            assert f.read(4) == head
    with pytest.raises(peftfx.ConfigError, match=r"\.svg, \.png"):
        visualize(pm, str(tmp_path / "g.jpeg"))
    with pytest.raises(peftfx.ConfigError, match="base="):
        visualize(gm, str(tmp_path / "g.svg"), diff=True)


def test_dot_output_needs_no_program_and_missing_dot_is_explained(twins, tmp_path, monkeypatch):
    _, pm = twins
    pm.set_adapter("default")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    source = open(visualize(pm, str(tmp_path / "g.dot"), fold=False)).read()
    assert source.startswith("digraph")
    for name in stamped(pm.graph_module):
        assert f'id="n-{name}"' in source
    with pytest.raises(GraphvizNotFoundError, match="apt-get install graphviz"):
        visualize(pm, str(tmp_path / "g.svg"))
    assert not (tmp_path / "g.svg").exists()


# -- HTML ----------------------------------------------------------------------------------------------

class _DomScan(html.parser.HTMLParser):
    """Elements' ids and classes, <body> attributes, and the embedded JSON, from a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, str, set]] = []
        self.body: dict = {}
        self.cards: dict[str, dict] = {}
        self._json = None
        self.data = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        if attrs.get("id") == "peftfx-data":
            self._json = ""
        if "data-adapter" in attrs:
            self.cards[attrs["data-adapter"]] = attrs
        self.elements.append((tag, attrs.get("id") or "", set((attrs.get("class") or "").split())))

    def handle_data(self, data):
        if self._json is not None:
            self._json += data

    def handle_endtag(self, tag):
        if tag == "script" and self._json is not None:
            self.data, self._json = json.loads(self._json), None


def _scan(text: str) -> _DomScan:
    scan = _DomScan()
    scan.feed(text)
    return scan


@needs_dot
def test_html_page_is_self_contained_with_adapter_panel(twins, tmp_path):
    ref, pm = twins
    pm.set_adapter("default")
    text = open(visualize(pm, str(tmp_path / "g.html")), encoding="utf-8").read()
    scan = _scan(text)
    assert not [e for e in scan.elements if e[0] in ("link", "img", "iframe")]
    assert "<script src" not in text and "@import" not in text and "url(" not in text
    card = scan.cards["default"]
    assert int(card["data-parameters"]) == peft_lora_parameters(ref, "default")
    assert set(scan.data["adapters"][0]["targets"]) == peft_adapted_modules(ref, "default")
    assert scan.cards["b"] and int(scan.cards["b"]["data-parameters"]) == peft_lora_parameters(ref, "b")
    # a bare GraphModule: the counts come from the parameters its adapter nodes read
    scan = _scan(open(visualize(pm.graph_module, str(tmp_path / "gm.html")), encoding="utf-8").read())
    assert int(scan.cards["default"]["data-parameters"]) == peft_lora_parameters(ref, "default")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


def _headless(browser: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chrome-profile'}",
               "--virtual-time-budget=3000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@needs_dot
def test_html_search_highlights_nodes_in_headless_chromium(twins, tmp_path):
    browser = _chromium()
    _, pm = twins
    pm.set_adapter("default")
    page = visualize(pm, str(tmp_path / "g.html"))
    query = "layers.0.self_attn.q_proj"
    url = f"file://{page}#search={query}"
    done = _headless(browser, tmp_path, "--dump-dom", url)
    assert done.returncode == 0, done.stderr[-2000:]
    scan = _scan(done.stdout)
    assert scan.body.get("data-ready") == "1", "the page's script did not run"
    hits = {i for tag, i, cls in scan.elements if tag == "g" and "node" in cls and "hit" in cls}
    expected = {f"n-{n.name}" for n in pm.graph_module.graph.nodes  # the linear and its LoRA nodes
                if list(n.meta.get("nn_module_stack", {"": ("", None)}).values())[-1][0] == "model." + query}
    assert len(expected) == 1 + len(FUSED_OPS) + len(FUSED_FIRST)
    assert hits == expected and int(scan.body["data-hits"]) == len(expected)
    shot = tmp_path / "search.png"
    done = _headless(browser, tmp_path, f"--screenshot={shot}", "--window-size=1280,800", url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000


# -- CLI and package ---------------------------------------------------------------------------------------

@needs_dot
def test_cli_draws_a_saved_adapter_and_a_random_init_config(twins, model_dirs, tmp_path, capsys):
    ref, pm = twins
    pm.save_pretrained(str(tmp_path / "adapter"), selected_adapters=["default"])
    out = tmp_path / "cli.svg"
    assert cli.main(["viz", model_dirs["llama"], "--adapter", str(tmp_path / "adapter"), "-o", str(out),
                     "--no-fold"]) == 0
    drawn = boxes(ET.parse(out).getroot())
    assert {b.module for b in adapter_boxes(drawn)} == peft_adapted_modules(ref, "default")
    config = os.path.join(model_dirs["llama"], "config.json")
    lora = json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["up_proj"]})
    out = tmp_path / "cli.dot"
    assert cli.main(["viz", config, "--random-init", "--config", lora, "-o", str(out), "--diff"]) == 0
    assert "model.layers.0.mlp.up_proj" in out.read_text() and "status-added" in out.read_text()
    assert cli.main(["viz", config, "--config", lora, "-o", str(out)]) == 1
    assert "--random-init" in capsys.readouterr().err


def test_import_peftfx_stays_light():
    code = "import sys, peftfx; print(sorted(m for m in ('graphviz', 'networkx') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    assert callable(peftfx.visualize)


@pytest.mark.slow
@needs_dot
def test_32_layer_llama_folds_to_one_layer(tmp_path):
    import transformers
    torch.manual_seed(0)
    config = CONFIGS["llama"][1]()
    config.num_hidden_layers = 32
    pm = peftfx.apply(transformers.LlamaForCausalLM(config).eval(),
                      peftfx.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    drawn = draw_svg(pm, tmp_path)
    assert [b.text for b in drawn.values() if "fold" in b.classes] == ["layers 1–31 same as layer 0"]
    assert len(drawn) < 300
