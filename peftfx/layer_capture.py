"""Capture whose cost does not grow with depth: the model once with each layer opaque, then one layer
per distinct layer structure, spliced back into one flat graph.

Exporting a whole model traces every layer; a 32-layer model takes several times a 4-layer one. Here
each layer's forward becomes one call of the custom op `peftfx::opaque_layer` while the model is
exported: its fake implementation runs the real layer on the fake inputs (for the output shapes) but
nothing inside is traced, so the top graph costs the same whatever the depth. The op records each
layer's inputs (their structure, the constants, and the fake tensors with their symbolic sizes). Then
the first layer of each structure (class, parameter shapes, input structure and sizes) is exported on
its own, from inputs of those sizes whose dims are dynamic where the top graph's were, and every layer
of that structure reuses its graph over its own parameters.

`LayeredCapture.fresh_module` splices the layer graph into the top graph at each op, renaming the
layer's parameters to the layer's own paths and extending the module stacks, so the result is the flat
graph a whole export gives (selection, the passes, blocks and the visualizer see no difference).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Optional, cast

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from .capture import UNBOUNDED, Capture, dim_range, module_owners
from .errors import CaptureError

OPAQUE_MARK = "_peftfx_opaque_forward"
CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)
_calls: dict[int, "LayerCall"] = {}  # op key -> the layer call it stands for (during one top export)
_keys = itertools.count()
_outputs_by_structure: dict[tuple, tuple] = {}  # during one top export: structure -> the first call's outputs


@torch.library.custom_op("peftfx::opaque_layer", mutates_args=())
def opaque_layer(tensors: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    """A layer while the top graph is exported; spliced away before anything runs."""
    raise CaptureError("peftfx::opaque_layer only stands for a layer while a model is exported; it cannot run.")


@opaque_layer.register_fake
def _opaque_layer_fake(tensors: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    return _calls[key].run_fake(tensors)


@dataclass
class LayerCall:
    """One layer call as the top export saw it."""

    key: int  # the op's key argument
    path: str  # the layer's module path in the model
    layer: nn.Module
    forward: Any  # the layer's own forward, bound
    spec: Any  # pytree spec of (args, kwargs)
    leaves: list  # the constants, None where a tensor goes
    tensor_slots: list[int]
    inputs: list[torch.Tensor] = field(default_factory=list)  # fake, with the top graph's symbolic sizes
    out_spec: Any = None
    out_leaves: list = field(default_factory=list)
    out_slots: list[int] = field(default_factory=list)

    def arguments(self, tensors: Any) -> tuple[tuple, dict]:
        """The layer's (args, kwargs) with these tensors where the call had its tensors."""
        leaves = list(self.leaves)
        for slot, tensor in zip(self.tensor_slots, tensors):
            leaves[slot] = tensor
        return pytree.tree_unflatten(leaves, self.spec)

    def call(self, tensors: list[torch.Tensor]) -> Any:
        args, kwargs = self.arguments(tensors)
        return self.forward(*args, **kwargs)

    def run_fake(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The layer's outputs for these fake inputs. Running a layer here costs as much as tracing it, so
        a layer of the same structure as one already run with inputs of the same sizes gets that one's
        output sizes (layers of one structure map equal input sizes to equal output sizes)."""
        self.inputs = list(tensors)
        structure = self.structure(sizes=False)
        known = _outputs_by_structure.get(structure)
        # Sizes are compared now, not when the first call was made: the first layer's inputs may carry
        # symbols proved equal to others only while that layer ran.
        if known is not None and _sizes(known[0]) == _sizes(tensors):
            _, self.out_spec, self.out_leaves, self.out_slots, outputs = known
            return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in outputs]
        outputs = self._run_fake(tensors)
        _outputs_by_structure[structure] = (self.inputs, self.out_spec, self.out_leaves, self.out_slots, outputs)
        return outputs

    def _run_fake(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        # Plain fake execution: nothing of it is recorded, so export's tracing modes are off meanwhile.
        with disable_proxy_modes_tracing(), torch._C.DisableTorchFunction():
            out_leaves, self.out_spec = pytree.tree_flatten(self.call(tensors))
        self.out_slots = [i for i, leaf in enumerate(out_leaves) if isinstance(leaf, torch.Tensor)]
        if any(not isinstance(leaf, (torch.Tensor, *CONSTANT_TYPES)) for leaf in out_leaves):
            raise CaptureError(f"layer {self.path} returns something other than tensors and constants")
        self.out_leaves = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in out_leaves]
        return [out_leaves[i].clone() for i in self.out_slots]  # a custom op's outputs alias nothing

    def rebuild(self, outputs: list[torch.Tensor]) -> Any:
        leaves = list(self.out_leaves)
        for slot, tensor in zip(self.out_slots, outputs):
            leaves[slot] = tensor
        return pytree.tree_unflatten(leaves, self.out_spec)

    def structure(self, sizes: bool = True) -> tuple:
        """What must agree for two layers to share one graph (`sizes`: the input sizes too)."""
        tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in self.layer.state_dict(keep_vars=True).items())
        key = (_module_structure(self.layer), tensors, str(self.spec), repr(self.leaves))
        return (*key, _sizes(self.inputs)) if sizes else key


@contextlib.contextmanager
def opaque_layers(model: nn.Module, paths: list[str]):
    """Each layer at `paths` calls `peftfx::opaque_layer` instead of running; yields the calls made."""
    made: list[LayerCall] = []
    patched = []
    for path in paths:
        layer = model.get_submodule(path)
        own = layer.__dict__.get("forward")
        bound = layer.forward

        def forward(*args: Any, _path: str = path, _layer: nn.Module = layer, _bound: Any = bound, **kwargs: Any):
            leaves, spec = pytree.tree_flatten((args, kwargs))
            if any(not isinstance(leaf, (torch.Tensor, *CONSTANT_TYPES)) for leaf in leaves):
                raise CaptureError(f"layer {_path} takes an input that is not a tensor or a constant")
            slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
            constants = [None if i in slots else leaf for i, leaf in enumerate(leaves)]
            call = LayerCall(next(_keys), _path, _layer, _bound, spec, constants, slots)
            _calls[call.key] = call
            made.append(call)
            return call.rebuild(torch.ops.peftfx.opaque_layer([leaves[i] for i in slots], call.key))

        setattr(forward, OPAQUE_MARK, True)
        layer.forward = forward
        patched.append((layer, own))
    try:
        yield made
    finally:
        for layer, own in patched:
            if own is None:
                del layer.forward
            else:
                layer.forward = own
        for call in made:
            _calls.pop(call.key, None)
        _outputs_by_structure.clear()


class FlatLayer(nn.Module):
    """A layer as a function of its tensor inputs alone (the constants fixed as the top graph had them),
    returning its tensor outputs: what is exported once per layer structure."""

    def __init__(self, call: LayerCall):
        super().__init__()
        self.layer = call.layer
        self._call = call

    def forward(self, *tensors: torch.Tensor) -> tuple:
        args, kwargs = self._call.arguments(tensors)
        out = pytree.tree_leaves(self.layer(*args, **kwargs))  # through __call__: its module stack
        return tuple(out[i] for i in self._call.out_slots)


# Attributes a layer may differ in and still share a layer graph: transformers' layer index only picks
# the layer's slot in a KV cache, and forward captures run without one (use_cache=False).
PER_LAYER_ATTRIBUTES = frozenset({"layer_idx"})
NN_MODULE_STATE = frozenset({"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def _module_structure(layer: nn.Module) -> tuple:
    """Every submodule's class and plain attributes: two layers run the same code only if these agree (a
    sliding-window size or an attention type is an attribute the graph bakes in). Other objects (a
    shared config) are compared by identity; hooks make a layer its own structure."""
    parts = []
    for name, module in layer.named_modules(remove_duplicate=False):
        attributes = []
        for key, value in sorted(vars(module).items()):
            if key in NN_MODULE_STATE or key in PER_LAYER_ATTRIBUTES or getattr(value, OPAQUE_MARK, False):
                continue  # (the forward opaque_layers puts on each layer while the top graph is exported)
            if isinstance(value, (dict, list, tuple, set)) and not value and key.startswith("_"):
                continue  # nn.Module's empty hook dictionaries
            plain = isinstance(value, CONSTANT_TYPES) or (
                isinstance(value, tuple) and all(isinstance(v, CONSTANT_TYPES) for v in value)
            )
            attributes.append((key, value if plain else _identity(value)))
        parts.append((name, type(module), tuple(attributes)))
    return tuple(parts)


def _identity(value: Any) -> Any:
    """How an attribute that is not a plain value is compared: a partial by what it calls with what (an
    activation module makes its own partial), anything else by identity (a shared config)."""
    if isinstance(value, functools.partial):
        return ("partial", id(value.func), repr(value.args), repr(sorted(value.keywords.items())))
    return id(value)


def _sizes(tensors: list[torch.Tensor]) -> tuple:
    return tuple((str(t.dtype), tuple(str(_canonical(s)) for s in t.shape), t.device.type) for t in tensors)


def _canonical(size: Any) -> Any:
    """A size as the shape environment knows it now: sizes proved equal after a tensor was made (the
    first layer's sequence length and the mask's) print as one symbol."""
    if not isinstance(size, torch.SymInt):
        return size
    return size.node.shape_env.replace(size.node.expr)


def _example(fake: torch.Tensor) -> torch.Tensor:
    shape = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in fake.shape]
    # Export traces with fake tensors, so the values do not matter; ones, not random numbers, leave the
    # global random state alone (a user's seeded dropout draws the same numbers as without peftfx).
    return torch.ones(shape, dtype=fake.dtype, device=fake.device)


def _layer_dims(top: torch.export.ExportedProgram, inputs: list[torch.Tensor]) -> list[Optional[dict[int, Any]]]:
    """Per layer input: its dims that are symbolic in the top graph, as Dims named by their symbol (one
    Dim per symbol, so sizes tied in the top graph stay tied), with the top graph's range; a size that
    is an expression of symbols becomes Dim.AUTO."""
    dims: dict[str, Any] = {}
    out: list[Optional[dict[int, Any]]] = []
    for tensor in inputs:
        axes: dict[int, Any] = {}
        for axis, size in enumerate(tensor.shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = _canonical(size)
            if not expr.is_Symbol:
                axes[axis] = Dim.AUTO
                continue
            if str(expr) not in dims:
                found = dim_range(top, expr)
                lo, hi = found if isinstance(found, tuple) else (found, found)
                dims[str(expr)] = Dim(f"layer_{expr}", min=max(lo, 0), max=None if hi >= UNBOUNDED else hi)
            axes[axis] = dims[str(expr)]
        out.append(axes or None)
    return out


def export_layer(top: torch.export.ExportedProgram, call: LayerCall) -> torch.export.ExportedProgram:
    """One layer, exported from inputs of the sizes the top graph gave it."""
    example = tuple(_example(t) for t in call.inputs)
    dynamic = _layer_dims(top, call.inputs)
    program = torch.export.export(FlatLayer(call), example, dynamic_shapes=(tuple(dynamic),), strict=False)
    program.example_inputs = None  # made-up values, a layer's activations in size: not kept
    return program


@dataclass
class LayerSite:
    """Where one layer's graph goes in the top graph: the op's key and the layer's target prefix."""

    key: int
    path: str  # module path in the model (for module stacks)
    prefix: str  # the same path as the top graph's attribute targets name it
    group: int  # index into LayeredCapture.layer_programs


@dataclass
class LayeredCapture(Capture):
    """A capture made as a top graph with opaque layers plus one graph per layer structure."""

    layer_programs: list[torch.export.ExportedProgram] = field(default_factory=list)
    sites: dict[int, LayerSite] = field(default_factory=dict)
    # target in the spliced graph -> the tensor it reads (the layer's own, as captured)
    layer_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _layer_modules: list[torch.fx.GraphModule] = field(default_factory=list)
    _sized: set[int] = field(default_factory=set)  # layer graphs whose sizes are the top graph's (_size_like_top)

    @property
    def layer_graphs(self) -> int:
        return len(self.layer_programs)

    def fresh_module(self) -> torch.fx.GraphModule:
        gm = super().fresh_module()
        if not self._layer_modules:
            self._layer_modules = [p.module(check_guards=False) for p in self.layer_programs]
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.peftfx.opaque_layer.default:
                self._splice(gm, node)
        gm.graph.lint()
        gm.recompile()
        return gm

    def _splice(self, gm: torch.fx.GraphModule, op: torch.fx.Node) -> None:
        site = self.sites[cast(int, op.args[1])]
        layer_gm = self._layer_modules[site.group]
        inputs = list(cast(list, op.args[0]))
        if site.group not in self._sized:
            _size_like_top(layer_gm, [node.meta.get("val") for node in inputs])
            self._sized.add(site.group)
        outer = dict(op.meta.get("nn_module_stack") or {})
        if not any(path == site.path for path, _ in outer.values()):
            outer[f"peftfx_layer_{site.path}"] = (site.path, type(gm).__qualname__)
        env: dict[torch.fx.Node, Any] = {}
        placeholders = iter(inputs)
        outputs: list[Any] = []
        with gm.graph.inserting_before(op):
            for node in layer_gm.graph.nodes:
                if node.op == "placeholder":
                    env[node] = next(placeholders)
                elif node.op == "output":
                    outputs = [env[a] if isinstance(a, torch.fx.Node) else a for a in pytree.tree_leaves(node.args[0])]
                elif node.op == "get_attr":
                    env[node] = gm.graph.get_attr(self._target(gm, site, layer_gm, node.target))
                    env[node].meta = dict(node.meta)
                else:
                    copied = gm.graph.node_copy(node, lambda n: env[n])
                    copied.meta["nn_module_stack"] = _stack(outer, node.meta.get("nn_module_stack"), site.path)
                    env[node] = copied
        for user in list(op.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outputs[cast(int, user.args[1])])
                gm.graph.erase_node(user)
            else:
                raise CaptureError(f"layer {site.path}: its outputs are used as a list, which peftfx cannot splice")
        gm.graph.erase_node(op)

    def _target(self, gm: torch.fx.GraphModule, site: LayerSite, layer_gm: torch.fx.GraphModule, target: str) -> str:
        """The spliced graph's name for a tensor the layer graph reads, registered on `gm`."""
        if target.startswith("layer."):
            name = f"{site.prefix}.{target[len('layer.') :]}"
            tensor = self.layer_tensors[name]
        else:  # a constant the layer export lifted: one copy for all layers of the structure
            name = f"_peftfx_layer{site.group}_{target.replace('.', '_')}"
            tensor = _get_attr(layer_gm, target)
        if not _has_attr(gm, name):
            _set_attr(gm, name, tensor)
        return name


class _TopSizes(FakeTensorProp):
    """Fake propagation in the top graph's fake mode; the layer's real tensors are converted as read."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self._mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value


def _size_like_top(layer_gm: torch.fx.GraphModule, inputs: list[Any]) -> None:
    """Give the layer graph's nodes sizes in the top graph's symbols (their `val`, propagated from the
    top graph's inputs of the layer), so that spliced nodes compare with the rest of the graph: a pass
    matching a mask's key dim against the scores' (passes/prefix.py) reads both. Every layer of one
    structure takes inputs of the same symbolic sizes, so this is done once per layer graph."""
    mode = detect_fake_mode(inputs)
    if mode is None or any(not isinstance(v, torch.Tensor) for v in inputs):
        raise CaptureError("the layer's inputs in the top graph carry no fake sizes")
    for node in layer_gm.graph.nodes:
        node.meta.pop("unbacked_bindings", None)  # the layer export's own symbols
    _TopSizes(layer_gm, mode=mode).propagate_dont_convert_inputs(*inputs)


def _stack(outer: dict, inner: Optional[dict], path: str) -> dict:
    """A layer node's module stack in the spliced graph: the op's own, then the layer's below it."""
    stack = dict(outer)
    for key, (inner_path, kind) in (inner or {}).items():
        if inner_path.startswith("layer."):
            stack[f"{path}::{key}"] = (f"{path}.{inner_path[len('layer.') :]}", kind)
    return stack


def _get_attr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _has_attr(module: nn.Module, target: str) -> bool:
    try:
        _get_attr(module, target)
    except AttributeError:
        return False
    return True


def _set_attr(root: nn.Module, target: str, tensor: torch.Tensor) -> None:
    *parents, name = target.split(".")
    module = root
    for part in parents:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(name, tensor)
    else:
        module.register_buffer(name, tensor)


def layered_capture(
    root: nn.Module,
    model: nn.Module,
    layer_paths: list[str],
    prefix: str,
    export_top: Any,
) -> tuple[torch.export.ExportedProgram, dict, dict]:
    """The top program (layers opaque) and what LayeredCapture needs besides; `export_top()` exports
    `root` as a whole capture would. `prefix`: how the root names the model ("" or "model.")."""
    with opaque_layers(model, layer_paths) as calls:
        top = export_top()
    structures: dict[tuple, int] = {}
    programs: list[torch.export.ExportedProgram] = []
    sites: dict[int, LayerSite] = {}
    tensors: dict[str, torch.Tensor] = {}
    owners: dict[str, tuple[dict[str, Any], str]] = {}
    for call in calls:
        structure = call.structure()
        if structure not in structures:
            structures[structure] = len(programs)
            programs.append(export_layer(top, call))
        group = structures[structure]
        sites[call.key] = LayerSite(call.key, call.path, prefix + call.path, group)
        for name, module in call.layer.named_modules(remove_duplicate=False):
            for found in (module._parameters, module._buffers):
                for key, tensor in found.items():
                    if tensor is None:
                        continue
                    target = ".".join(p for p in (prefix + call.path, name, key) if p)
                    tensors[target] = tensor
                    owners[target] = (found, key)
    owners.update(module_owners(top, root))
    return top, {"layer_programs": programs, "sites": sites, "layer_tensors": tensors}, owners
