"""What the per-pass tests share: a fresh graph and the PassContext the engine would build for it, tiny
models, and node counting by provenance.

`variant_setup` is peftfx/state/variants.py's `build_variant` up to (not including) the pipeline: the
same mounts, site annotations, row-index input and PassContext. A test then runs the passes it needs
with `run_pass` itself, one at a time, and looks at what each did.

tests/passes is a package (it has an __init__.py), so its modules import as `passes.test_fuse` and
never clash with tests/test_fuse.py; tests/conftest.py is on sys.path as `conftest` in either run
(pytest puts tests/ there to import it, and again as the package's base folder).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn

from conftest import CONFIGS, batch, bnb_dequantize_path, perturb_trainable  # noqa: F401  (tests/conftest.py)
from peftfx.rewrite import PassContext, made_by, provenance_of, run_pass
from peftfx.state.variants import VariantSpec, prepare_variant

aten = torch.ops.aten


# -- models ------------------------------------------------------------------------------------------

def tiny_hf(name: str, seed: int = 0, attn: Optional[str] = None, **config: Any) -> nn.Module:
    """A tests/conftest.py model built in memory (no save and load), with config overrides (fewer layers)."""
    cls, make_config = CONFIGS[name]
    cfg = make_config()
    for key, value in config.items():
        setattr(cfg, key, value)
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(cfg).eval()


# -- the context the engine builds ---------------------------------------------------------------------

def variant_setup(pm, capture, spec: Optional[VariantSpec] = None, bind: Optional[tuple] = None,
                  training: Optional[bool] = None, fuse: bool = True,
                  **changes: Any) -> tuple[fx.GraphModule, PassContext]:
    """(fresh graph of `capture`, the PassContext build_variant gives the pipeline) for `spec` (default:
    the current state's). `changes` replace context fields afterwards (a test's deliberately odd context)."""
    state = pm.state
    spec = state.spec_for(capture) if spec is None else spec
    if training is not None:
        spec = dataclasses.replace(spec, training=training)
    if bind is None:
        bind = state.bound_adapters() if spec.lora else ()
    gm, ctx = prepare_variant(capture, state.model, state.store, spec, bind, state.quant, fuse)
    state.before_run(bind if spec.lora else spec.mixed, spec.training)  # methods' per-run constants (DoRA)
    return gm, dataclasses.replace(ctx, **changes) if changes else ctx


def run(gm: fx.GraphModule, ctx: PassContext, *passes) -> list[int]:
    """Run passes in order on `gm`; how many nodes each rewrote."""
    return [run_pass(gm, p, ctx) for p in passes]


# -- counting ---------------------------------------------------------------------------------------

def made(gm: fx.GraphModule, rule: str) -> Counter:
    """op target -> how many call_function / get_attr nodes `<pass>.<rule>` made (or retargeted)."""
    return Counter(n.target if n.op == "call_function" else "get_attr" for n in gm.graph.nodes
                   if n.op in ("call_function", "get_attr") and made_by(n, rule))


def made_nodes(gm: fx.GraphModule, rule: str) -> list[fx.Node]:
    """The nodes `<pass>.<rule>` made, in graph order."""
    return [n for n in gm.graph.nodes if made_by(n, rule)]


def ops(gm: fx.GraphModule, targets: Optional[Iterable[Any]] = None) -> Counter:
    """op target -> how many call_function nodes call it (all targets, or only `targets`)."""
    wanted = None if targets is None else set(targets)
    return Counter(n.target for n in gm.graph.nodes
                   if n.op == "call_function" and (wanted is None or n.target in wanted))


def stamped(gm: fx.GraphModule) -> set[str]:
    """The `<pass>.<rule>` names found on the graph's nodes."""
    return {p.qualified for p in map(provenance_of, gm.graph.nodes) if p is not None}


# -- a tiny model with every kind of linear site --------------------------------------------------------

class Block(nn.Module):
    """q, k and v read one input (a group for passes/fuse.py), `conv` is GPT-2's Conv1D (addmm with an
    (in, out) weight), `out` reads another input and `head` is never targeted here.

    `compute(x, call)` is the forward with each site's call made by `call(name, input)`: the tests' eager
    references pass the site formula they expect the rewritten graph to compute."""

    SITES = ("q", "k", "v", "conv", "out")

    def __init__(self, d: int = 8, classes: int = 3):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)
        self.conv = Conv1D(d, d)
        self.out = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.compute(x, lambda name, h: getattr(self, name)(h))

    def compute(self, x, call):
        h = call("q", x) * torch.sigmoid(call("k", x)) + call("v", x) + call("conv", x)
        return call("head", torch.tanh(call("out", h)))


def block(seed: int = 0) -> tuple[Block, torch.Tensor]:
    torch.manual_seed(seed)
    return Block().eval(), torch.randn(3, 5, 8)


def base_weight(net: nn.Module, key: str) -> torch.Tensor:
    """A site's base weight as (out, in) (Conv1D keeps (in, out))."""
    from transformers.pytorch_utils import Conv1D
    module = net.get_submodule(key)
    return module.weight.T if isinstance(module, Conv1D) else module.weight
