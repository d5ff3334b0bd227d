"""Export: a PeftFxModel becomes a `.pt2` artifact that runs without peftfx.

Two kinds of graph go out:

- merged (default): the base graph, with each active adapter's `scaling * B @ A` folded into a copy of
  the base weight inside the artifact (the user's model is not touched). Runs at base-model cost.
- unmerged: the active variant graph itself; adapter tensors are parameters (A, B) and constants
  (scaling) of the artifact. Every adapter with the same layout fits the same artifact, so next to
  the artifact peftfx writes `<artifact>.adapters/<name>.safetensors`, each keyed by the artifact's own
  tensor names: copying one of them into the loaded module switches adapters (see docs/export.md).

With `aoti=True` the program is compiled ahead of time by AOTInductor into a package that
`torch._inductor.aoti_load_package` loads. Files are written to a temporary name and renamed, so a
failed export never leaves a partial artifact behind (peftfx.save_store.atomic_write). Each step logs on
"peftfx.export" (peftfx.progress).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Sequence, cast

import torch
from torch import fx
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from peftfx.capture import export_dynamic
from peftfx.errors import ExportError
from peftfx.model import PeftFxModel
from peftfx.progress import bar, get_logger, timed
from peftfx.rewrite import MOUNT, QUANT_MOUNT
from peftfx.rewrite.graph_inputs import keyword_inputs, placeholder, remove_keyword_input
from peftfx.save_store import atomic_write
from peftfx.state import VariantSpec
from peftfx.state.store import module_at

ADAPTERS_SUFFIX = ".adapters"
log = get_logger("export")


def export(
    pm: PeftFxModel,
    path: str,
    *,
    merged: bool = True,
    aoti: bool = False,
    adapter_names: Optional[Sequence[str]] = None,
    example_inputs: Optional[dict[str, Any]] = None,
) -> str:
    """Write `pm` (its active adapters, or `adapter_names`) as a torch.export artifact at `path`.

    `merged=True` folds the adapters into the artifact's weights; `merged=False` keeps them separate
    and also writes every same-layout adapter's tensors beside it. `aoti=True` writes an AOTInductor
    package instead of an ExportedProgram. Batch and sequence length stay dynamic. Returns `path`.
    Each step logs on the "peftfx.export" logger (with its duration when it took seconds).
    """
    check_path(path)
    adapters = _adapters(pm, adapter_names)
    example = _example(pm, example_inputs)
    gm, spec = _graph(pm, adapters, merged, example)
    # export binds a GraphModule's inputs in the order of its placeholders: give them in that order.
    # Constants (use_cache=False) were bound into the graph, so the artifact takes tensors only.
    example = {name: example[name] for name in keyword_inputs(gm)}
    capturer = pm.state.capturer
    axes = {n: capturer.axes_for(n, v) for n, v in example.items()}
    kind = "merged" if merged else "unmerged"
    with timed(log, f"exporting the {kind} graph ({len(gm.graph.nodes)} nodes) with torch.export"):
        program = export_dynamic(gm, example, axes, capturer.max_seq())
    _keep_range_checks_only(program)
    if merged:
        _fold_adapters(pm, program, adapters)
    sidecars = adapter_tensors(pm, program, adapters[0]) if spec.lora else {}
    if aoti:
        with timed(log, f"compiling {path} with AOTInductor (this takes minutes)"):
            atomic_write(path, lambda tmp: torch._inductor.aoti_compile_and_package(program, package_path=tmp))
    else:
        with timed(log, f"saving {path}"):
            atomic_write(path, lambda tmp: torch.export.save(program, tmp))
    log.debug("wrote %s (%.1f MiB)", path, os.path.getsize(path) / 2**20)
    if sidecars:
        _write_sidecars(path, sidecars)
    return path


# -- what goes in ---------------------------------------------------------------------------------------


def check_path(path: str) -> None:
    """Refuse a path export cannot write (before anything is loaded or exported)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write {path}: the folder {folder} does not exist; create it first.")
    if not path.endswith(".pt2"):
        raise ExportError(f"export writes .pt2 files (torch.export / AOTInductor packages); got {path!r}.")


def _adapters(pm: PeftFxModel, names: Optional[Sequence[str]]) -> list[str]:
    if names is None:
        return [] if pm.state.disabled else list(pm.active_adapters)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in pm.peft_config]
    if unknown:
        raise ExportError(f"unknown adapter(s) {unknown}; this model has {sorted(pm.peft_config)}.")
    return names


def _example(pm: PeftFxModel, example_inputs: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The call to export with: the user's example inputs, or ones made from the model's config."""
    if example_inputs is None:
        return pm.state.reference_inputs()
    return pm.state.capturer.prepare_inputs((), dict(example_inputs))


def _graph(
    pm: PeftFxModel, adapters: list[str], merged: bool, named: dict[str, Any]
) -> tuple[fx.GraphModule, VariantSpec]:
    """A fresh eval-mode variant graph (never a cached one: its inputs are edited below)."""
    store = pm.adapters
    if len(adapters) > 1 and any(store.method_of(a).stage == "inputs" for a in adapters):
        raise ExportError("a prompt-learning adapter exports alone; pass adapter_names=[one adapter].")
    if merged and pm.quant is not None and any(store.sites.get(a) for a in adapters):
        raise ExportError(
            "merged export onto a quantized base is not supported (folding would requantize); "
            "export with merged=False, or merge_and_unload(dequantize=True) and apply peftfx "
            "to the result."
        )
    gm, spec = pm.state.fresh_variant(named, adapters, fold_adapters=merged)  # as pm runs it
    _keep_only_what_the_graph_reads(gm)
    _drop_constant_inputs(gm, {n for n, v in named.items() if isinstance(v, torch.Tensor)})
    _plain_outputs(gm)
    return gm, spec


def _keep_only_what_the_graph_reads(gm: fx.GraphModule) -> None:
    """Leave out tensors the graph never reads (other adapters' weights), so the artifact carries only
    its own. The adapter store and the quant store are shared with the PeftFxModel, so their mounts are
    replaced by fresh holders of the tensors read (same tensor objects), never pruned in place."""
    for mount in (MOUNT, QUANT_MOUNT):
        if hasattr(gm, mount):
            holder = torch.nn.Module()
            for node in gm.graph.nodes:
                if node.op == "get_attr" and node.target.startswith(mount + "."):
                    _hold(holder, node.target[len(mount) + 1 :], gm.get_submodule(mount))
            setattr(gm, mount, holder)
    gm.delete_all_unused_submodules()


def _hold(holder: torch.nn.Module, path: str, source: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = source.get_submodule(parent)
    holder = module_at(holder, parent, create=True)
    if leaf in owner._parameters:
        holder._parameters[leaf] = owner._parameters[leaf]
    elif leaf in owner._buffers:
        holder.register_buffer(leaf, owner._buffers[leaf], persistent=leaf not in owner._non_persistent_buffers_set)
    else:
        setattr(holder, leaf, getattr(owner, leaf))


def _drop_constant_inputs(gm: fx.GraphModule, tensors: set[str]) -> None:
    """Remove inputs the graph does not read (use_cache=False and friends) so the artifact takes tensors only."""
    for name in keyword_inputs(gm):
        if name not in tensors:
            if placeholder(gm, name).users:
                raise ExportError(f"the graph reads the non-tensor input {name!r}; export cannot bind it yet.")
            remove_keyword_input(gm, name)
    gm.recompile()


def _keep_range_checks_only(program: torch.export.ExportedProgram) -> None:
    """Drop export's extra shape guards; the artifact still checks each input's dim ranges.

    Some guards only record which path a reshape took at the example size (GPT-2's mask view adds
    `seq != 1`); they would refuse sequence length 1, which the graph computes correctly. peftfx runs its
    own graphs the same way (`Capture.fresh_module`: ranges checked, guards off), and its tests check
    those sizes (batch 1, sequence 1) against eager PyTorch and PEFT."""
    program._guards_code = []


def _plain_outputs(gm: fx.GraphModule) -> None:
    """Return a transformers ModelOutput as a plain dict, so loading the artifact needs only torch
    (torch.export cannot deserialize an output type whose module is not imported)."""
    codegen = cast(_PyTreeCodeGen, gm.graph._codegen)  # exported graphs keep the pytree calling convention
    info = codegen.pytree_info
    spec = info.out_spec
    if spec is not None and spec.type is not dict and isinstance(spec.type, type) and issubclass(spec.type, dict):
        plain = pytree.TreeSpec(dict, list(spec.context), list(spec.children()))
        codegen.pytree_info = info._replace(out_spec=plain)
        gm._out_spec = plain
        gm.recompile()


# -- weights ---------------------------------------------------------------------------------------------


def _names_by_identity(program: torch.export.ExportedProgram) -> dict[int, str]:
    tensors = {**program.constants, **program.state_dict}
    return {id(t): name for name, t in tensors.items()}


def _fold_adapters(pm: PeftFxModel, program: torch.export.ExportedProgram, adapters: list[str]) -> None:
    """Replace each adapted weight of the artifact by a merged copy, as each adapter's method merges it
    (the user's weight is untouched)."""
    names = _names_by_identity(program)
    weights = dict(pm.base_model.named_parameters(remove_duplicate=False))
    store = pm.adapters
    todo = [
        (adapter, site)
        for adapter in adapters
        if adapter not in pm.merged_adapters and store.method_of(adapter).can_merge  # else nothing to fold
        for site in store.method_of(adapter).merge_sites(store, adapter)
    ]
    with torch.no_grad():
        for adapter, site in bar(todo, desc="Folding adapters into the artifact", logger=log):
            method = store.method_of(adapter)
            name = names[id(weights[method.weight_path(site)])]
            current = program.state_dict[name].detach()
            merged = method.merge_weight(store, adapter, site, current, {})
            program.state_dict[name] = torch.nn.Parameter(merged, requires_grad=False)


def adapter_tensors(pm: PeftFxModel, program: torch.export.ExportedProgram, exported: str) -> dict[str, dict]:
    """For each adapter with the exported adapter's layout: artifact tensor name -> that adapter's tensor."""
    store = pm.adapters
    names = _names_by_identity(program)
    roles = {}  # artifact name -> (site key, the method's name for the tensor: "A", "B", "scaling", ...)
    for key, tensors in store.site_tensors(exported).items():
        for role, tensor in tensors.items():
            if id(tensor) in names:
                roles[names[id(tensor)]] = (key, role)
    layout = store.layout(exported)
    same = tuple(adapter for adapter in store.sites if store.layout(adapter) == layout)
    pm.state.before_run(same, training=False)  # constants the graph reads (DoRA's norm scale) made current
    return {
        adapter: {
            name: store.site_tensors(adapter)[key][role].detach().contiguous() for name, (key, role) in roles.items()
        }
        for adapter in same
    }


def _write_sidecars(path: str, sidecars: dict[str, dict]) -> None:
    from safetensors.torch import save_file

    folder = path + ADAPTERS_SUFFIX
    os.makedirs(folder, exist_ok=True)
    for adapter, tensors in sidecars.items():
        target = os.path.join(folder, f"{adapter}.safetensors")
        atomic_write(target, functools.partial(save_file, tensors))  # save_file(tensors, tmp)
    log.info("wrote %d adapter weight file(s) for this artifact to %s/", len(sidecars), folder)


def load_adapter_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy an adapter's tensors (from `<artifact>.adapters/<name>.safetensors`) into a loaded artifact.

    Needs only torch; docs/export.md shows the same three lines for code that does not import peftfx."""
    own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    missing = [n for n in tensors if n not in own]
    if missing:
        raise KeyError(f"the module has no tensors named {missing[:3]}; was it exported from the same layout?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)


__all__ = ["export", "ExportError", "adapter_tensors", "load_adapter_into", "ADAPTERS_SUFFIX"]
