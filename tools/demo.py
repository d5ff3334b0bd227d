"""The peftfx demo: LoRA on a tiny built-in Llama, end to end, on CPU, with nothing downloaded.

    peftfx demo [--steps N] [--out DIR]

Steps: build a tiny LlamaForCausalLM from a LlamaConfig, make a toy dataset (a repeating token
cycle, so the loss visibly drops), apply LoRA to q_proj/v_proj, train with AdamW, save the adapter,
load it onto a fresh copy of the base model and check the logits are equal, write the rewritten
graph's code to DIR/graph.py and draw it (DIR/graph.svg and DIR/graph.html; DIR/graph.dot when
graphviz is not installed), export a merged .pt2 artifact (DIR/model.pt2) and check it, then merge
and unload (DIR/merged/, saved with transformers). The last lines say what to open next.
"""

from __future__ import annotations

import copy
import os
import pathlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from peftfx.errors import DemoError
from peftfx.rewrite.annotations import made_by
from peftfx.save_store import atomic_write

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_STEPS = 30
DEFAULT_OUT = "peftfx-demo-out"
GRAPH_FILE = "graph.py"
LOGITS_ATOL = 1e-5  # the design's bar for "same math" in fp32; a reload is expected to be exact
MERGED_ATOL = 1e-4  # merged weights round differently from the unmerged sum W x + s B A x
ARTIFACT_FILE = "model.pt2"

# The toy task: every sequence walks the cycle 10, 11, ..., 17, 10, ... from a different start.
CYCLE_START, CYCLE_LEN = 10, 8
SEQ_LEN, NUM_SEQUENCES, BATCH = 32, 8, 4


@dataclass
class DemoResult:
    first_loss: float
    last_loss: float
    trainable_params: int
    total_params: int
    adapter_files: list[str]
    reload_max_abs_diff: float
    adapter_vs_base_max_abs_diff: float
    lora_nodes: int
    adapted_sites: list[str]
    graph_path: str
    drawings: list[str]
    artifact_path: str
    artifact_max_abs_diff: float
    seconds: float


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer LlamaForCausalLM (hidden 64, vocab 256) with fixed random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # Larger than Llama's 0.02 so that a q/v-only adapter can move the logits within a few steps.
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def toy_dataset() -> torch.Tensor:
    """[NUM_SEQUENCES, SEQ_LEN] token ids: the cycle CYCLE_START..CYCLE_START+CYCLE_LEN-1, each row
    starting at another phase. Next-token prediction on it is easy to learn."""
    positions = torch.arange(SEQ_LEN).unsqueeze(0) + torch.arange(NUM_SEQUENCES).unsqueeze(1)
    return CYCLE_START + positions % CYCLE_LEN


def count_lora_nodes(gm: torch.fx.GraphModule) -> int:
    """Nodes the LoRA pass inserted (their provenance names the pass "lora")."""
    return sum(1 for node in gm.graph.nodes if made_by(node, "lora"))


def run_demo(
    steps: int = DEFAULT_STEPS,
    out: str = DEFAULT_OUT,
    lr: float = 1e-2,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run every step of the demo, logging what it does; raises DemoError if a check fails."""
    import peftfx

    if steps < 1:
        raise DemoError(f"--steps must be at least 1, got {steps}.")
    start = time.perf_counter()

    log("[1/10] building a tiny LlamaForCausalLM from a LlamaConfig (hidden 64, 2 layers, vocab 256)")
    model = tiny_llama(seed)
    fresh_base = copy.deepcopy(model)  # untouched copy for the reload check

    data = toy_dataset()
    log(
        f"[2/10] toy dataset: {data.shape[0]} sequences of {data.shape[1]} tokens cycling through "
        f"{CYCLE_START}..{CYCLE_START + CYCLE_LEN - 1}, e.g. {data[0, :10].tolist()} ..."
    )

    log(
        "[3/10] peftfx.apply(model, LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj']))"
        " - captures the model with torch.export and adds the adapter"
    )
    config = peftfx.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    pm = peftfx.apply(model, config)
    sites = list(pm.adapters.sites["default"])
    log(f"      adapted {len(sites)} linear ops: {', '.join(sites)}")
    pm.print_trainable_parameters()
    trainable, total = pm.get_nb_trainable_parameters()

    log(f"[4/10] training {steps} step(s) with AdamW (lr={lr}, batch {BATCH})")
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    losses = []
    for step in range(steps):
        first = (step * BATCH) % data.shape[0]
        ids = data[first : first + BATCH]
        output = pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
        log(f"      step {step + 1:3d}/{steps}  loss {losses[-1]:.4f}")
    log(f"      loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    pm.eval()

    probe = data[:2]
    mask = torch.ones_like(probe)
    with torch.no_grad():
        logits = pm(input_ids=probe, attention_mask=mask).logits
        with pm.disable_adapter():
            base_logits = pm(input_ids=probe, attention_mask=mask).logits
    adapter_effect = (logits - base_logits).abs().max().item()

    log(f"[5/10] pm.save_pretrained({out!r})")
    pm.save_pretrained(out)
    files = [name for name in sorted(os.listdir(out)) if name.startswith("adapter_")]
    for name in files:
        log(f"      {os.path.join(out, name)}  ({os.path.getsize(os.path.join(out, name)):,d} bytes)")
    log(f"      (they link into {os.path.join(out, '.peftfx')}/, which makes each save all-or-nothing)")

    log("[6/10] peftfx.load(fresh copy of the base model, out) and comparing logits")
    reloaded = peftfx.load(fresh_base, out)
    reloaded.eval()
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=probe, attention_mask=mask).logits
    diff = (logits - reloaded_logits).abs().max().item()
    if diff > LOGITS_ATOL:
        raise DemoError(f"reloaded adapter gives different logits (max |diff| = {diff:.3g} > {LOGITS_ATOL}).")
    exact = "bit-identical" if torch.equal(logits, reloaded_logits) else f"max |diff| = {diff:.3g}"
    log(f"      logits equal ({exact}); with the adapter disabled they differ by up to {adapter_effect:.4f}")

    gm = pm.graph_module
    lora_nodes = count_lora_nodes(gm)
    log(
        f"[7/10] the LoRA pass inserted {lora_nodes} nodes into the graph "
        f"({len(sites)} sites; the graph has {len(gm.graph.nodes)} nodes in all)"
    )
    graph_path = atomic_write(
        os.path.join(out, GRAPH_FILE),
        f"# pm.graph_module.code of the peftfx demo: the eval-mode graph with LoRA on {len(sites)} sites.\n"
        f"# Nodes the LoRA pass inserted read their weights from self.peftfx_slots (bound to the adapter).\n" + gm.code,
    )
    log(f"      wrote the rewritten graph's code (pm.graph_module.code) to {graph_path}")

    drawings = draw(pm, out, log)

    log(
        f"[9/10] peftfx.export(pm, {os.path.join(out, ARTIFACT_FILE)!r}): the merged graph as a torch.export "
        "artifact that runs without peftfx"
    )
    artifact = peftfx.export(pm, os.path.join(out, ARTIFACT_FILE))
    with torch.no_grad():
        exported_logits = torch.export.load(artifact).module()(input_ids=probe, attention_mask=mask)["logits"]
    artifact_diff = (exported_logits - logits).abs().max().item()
    if artifact_diff > MERGED_ATOL:
        raise DemoError(f"the exported artifact gives different logits (max |diff| = {artifact_diff:.3g}).")
    log(
        f"      wrote {artifact} ({os.path.getsize(artifact):,d} bytes); torch.export.load(...).module() "
        f"gives the same logits (max |diff| = {artifact_diff:.3g})"
    )

    log("[10/10] pm.merge_adapter(): folding scaling * B @ A into the base weights")
    with torch.no_grad():
        pm.merge_adapter()
        merged_logits = pm(input_ids=probe, attention_mask=mask).logits
    merge_diff = (merged_logits - logits).abs().max().item()
    if merge_diff > MERGED_ATOL:
        raise DemoError(f"merged model gives different logits (max |diff| = {merge_diff:.3g} > {MERGED_ATOL}).")
    log(
        f"      merged logits match the unmerged ones (max |diff| = {merge_diff:.3g}); the graph that runs "
        f"now has {count_lora_nodes(pm.graph_module)} LoRA nodes"
    )
    plain: PreTrainedModel = pm.merge_and_unload()  # the tiny Llama itself, adapters merged in
    merged_dir = os.path.join(out, "merged")
    plain.save_pretrained(merged_dir)
    log(f"      merge_and_unload() -> {type(plain).__name__}, saved with transformers to {merged_dir}")

    seconds = time.perf_counter() - start
    log(f"done in {seconds:.1f} s")
    for line in next_steps(out, drawings, artifact, merged_dir):
        log(line)
    return DemoResult(
        losses[0],
        losses[-1],
        trainable,
        total,
        files,
        diff,
        adapter_effect,
        lora_nodes,
        sites,
        graph_path,
        drawings,
        artifact,
        artifact_diff,
        seconds,
    )


def next_steps(out: str, drawings: list[str], artifact: str, merged_dir: str) -> list[str]:
    """The demo's closing lines: what it wrote and what to open or run next, with paths."""
    lines = ["", f"What to look at next (everything is in {out}{os.sep}):"]
    html = next((p for p in drawings if p.endswith(".html")), None)
    if html is not None:
        url = pathlib.Path(os.path.abspath(html)).as_uri()
        lines.append(f"  open {url}#search=q_proj in a browser: the graph, LoRA's nodes coloured, q_proj highlighted")
    else:
        lines.append(f"  {drawings[0]}: the graph in graphviz's format (install graphviz for graph.svg and graph.html)")
    lines += [
        f"  {os.path.join(out, GRAPH_FILE)}: the code of the rewritten graph that runs (pm.graph_module.code)",
        f"  peftfx.load(model, {out!r}): the adapter again (HF PEFT's PeftModel.from_pretrained reads it too)",
        f"  torch.export.load({artifact!r}).module()(input_ids=ids): the model without peftfx",
        f"  transformers.AutoModelForCausalLM.from_pretrained({merged_dir!r}): the merged model, plain transformers",
    ]
    return lines


def draw(pm, out: str, log: Callable[[str], None]) -> list[str]:
    """graph.svg and graph.html with the visualizer; graph.dot alone when graphviz's dot is missing."""
    import peftfx
    from peftfx.errors import GraphvizNotFoundError

    log("[8/10] peftfx.visualize(pm, ...): drawing where the adapter went (layers folded, LoRA coloured)")
    try:
        paths = [peftfx.visualize(pm, os.path.join(out, name)) for name in ("graph.svg", "graph.html")]
    except GraphvizNotFoundError as exc:
        log(f"      {exc}")
        paths = [peftfx.visualize(pm, os.path.join(out, "graph.dot"))]
    for path in paths:
        log(f"      wrote {path}")
    return paths
