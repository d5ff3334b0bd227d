"""Run a variant eagerly through torch's direct Python bindings instead of `torch.ops.aten` overloads.

A variant graph calls `torch.ops.aten.mul.Tensor(x, y)`. Calling an overload from Python goes through
the JIT operator path (an extra Python frame, then matching arguments against the schema), which costs
about 1 µs more per call than `torch.mul(x, y)` for the same kernel. A decode step is a few hundred
small calls, so that is several percent of it. `eager_forward` generates the variant's code a second
time with each overload in `BINDINGS` replaced by its direct binding and binds it to the variant module
itself, so it reads the same parameters and slot bank at every call. The GraphModule keeps its aten
graph: torch.compile, export and the visualizer see exactly what the passes wrote.

A binding is listed only where it takes the overload's arguments unchanged (same order, same keyword
names); nodes whose keywords the binding does not take keep their overload.

Two more per-call costs go the same way. A `get_attr` node reads `self.model.layers.0.mlp.up_proj.weight`
through one `nn.Module.__getattr__` call per dot (450-930 a decode step of the benchmark model, several
percent of it); the eager forward reads it from the dictionary its owning module keeps it in
(`up_proj._parameters["weight"]`), resolved once when the forward is built. The tensor itself is not
bound: slot banks rebind adapters by replacing their holders' entries (peftfx/state/slots.py), merging on
a quantized base replaces the packed buffers (`QuantStore.replace`), and a user may assign a parameter;
the owning module and its dictionaries stay the same objects for the variant's life (anything that
replaces a module the graph reads from, quantizing or `.to()`, drops the variants). And export's calling
convention (`fx_pytree.tree_flatten_spec` over the inputs, `pytree.tree_unflatten` of a single output)
becomes plain unpacking (`keys_0, keys_1, = keys[0], keys[1]`), the same leaves without a pytree walk.
"""

from __future__ import annotations

import copy
import types
from typing import Any, Callable, Optional

import torch
from torch import fx
from torch.fx.graph import _format_target, _PyTreeCodeGen
from torch.fx.graph_module import _forward_from_src
from torch.utils._pytree import TreeSpec

aten = torch.ops.aten
Tensor = torch.Tensor

# overload -> (direct binding, keyword arguments it takes like the overload does)
BINDINGS: dict[torch._ops.OpOverload, tuple[Callable, frozenset]] = {
    aten.add.Tensor: (torch.add, frozenset({"alpha"})),
    aten.sub.Tensor: (torch.sub, frozenset({"alpha"})),
    aten.mul.Tensor: (torch.mul, frozenset()),
    aten.div.Tensor: (torch.div, frozenset()),
    aten.neg.default: (torch.neg, frozenset()),
    aten.pow.Tensor_Scalar: (torch.pow, frozenset()),
    aten.rsqrt.default: (torch.rsqrt, frozenset()),
    aten.sin.default: (torch.sin, frozenset()),
    aten.cos.default: (torch.cos, frozenset()),
    aten.tanh.default: (torch.tanh, frozenset()),
    aten.silu.default: (torch._C._nn.silu, frozenset()),
    aten.gelu.default: (torch._C._nn.gelu, frozenset({"approximate"})),
    aten.relu.default: (torch.relu, frozenset()),
    aten.mean.dim: (torch.mean, frozenset({"dtype"})),
    aten.softmax.int: (torch.softmax, frozenset()),
    aten.where.self: (torch.where, frozenset()),
    aten.linear.default: (torch._C._nn.linear, frozenset()),
    aten.addmm.default: (torch.addmm, frozenset({"beta", "alpha"})),
    aten.mm.default: (torch.mm, frozenset()),
    aten.bmm.default: (torch.bmm, frozenset()),
    aten.matmul.default: (torch.matmul, frozenset()),
    aten.embedding.default: (torch.embedding, frozenset()),
    aten.layer_norm.default: (torch.layer_norm, frozenset()),
    aten.scaled_dot_product_attention.default: (
        torch._C._nn.scaled_dot_product_attention,
        frozenset({"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"}),
    ),
    aten.cat.default: (torch.cat, frozenset()),
    aten.view.default: (Tensor.view, frozenset()),
    aten.reshape.default: (torch.reshape, frozenset()),
    aten.transpose.int: (torch.transpose, frozenset()),
    aten.permute.default: (torch.permute, frozenset()),
    aten.unsqueeze.default: (torch.unsqueeze, frozenset()),
    aten.select.int: (torch.select, frozenset()),
    aten.t.default: (torch.t, frozenset()),
    aten.expand.default: (Tensor.expand, frozenset()),
    aten.index_copy_.default: (Tensor.index_copy_, frozenset()),
    aten.clone.default: (torch.clone, frozenset({"memory_format"})),
    aten.detach.default: (torch.detach, frozenset()),
    # the decode graph's mask and position arithmetic (a few dozen calls a step)
    aten.sym_size.int: (Tensor.size, frozenset()),
    aten.arange.default: (torch.arange, frozenset({"dtype", "layout", "device", "pin_memory"})),
    aten.add_.Tensor: (Tensor.add_, frozenset({"alpha"})),
    aten.to.dtype: (Tensor.to, frozenset({"non_blocking", "copy", "memory_format"})),
    aten.to.device: (Tensor.to, frozenset({"non_blocking", "copy", "memory_format"})),
    aten.le.Tensor: (torch.le, frozenset()),
    aten.__and__.Tensor: (Tensor.__and__, frozenset()),
    aten.new_ones.default: (Tensor.new_ones, frozenset({"dtype", "layout", "device", "pin_memory"})),
}


def lowered_graph(graph: fx.Graph) -> tuple[fx.Graph, int]:
    """A copy of `graph` with every listed overload call replaced by its binding; how many were."""
    lowered = copy_graph(graph)
    count = 0
    for node in lowered.nodes:
        entry = BINDINGS.get(node.target) if node.op == "call_function" else None
        if entry is not None and set(node.kwargs) <= entry[1]:
            node.target = entry[0]
            count += 1
    return lowered, count


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph`'s nodes that shares its calling convention (codegen) instead of deep-copying it:
    `copy.deepcopy(graph)` copies the codegen's pytree specs, and each copied `LeafSpec` raises torch's
    deprecation FutureWarning. The specs are immutable, so sharing them is safe."""
    copied = fx.Graph(tracer_cls=graph._tracer_cls)
    copied._codegen = copy.copy(graph._codegen)
    result = copied.graph_copy(graph, {}, return_output_node=True)
    if isinstance(result, tuple):  # (the output's value, the old output node), as Graph.__deepcopy__ does
        value, old_output = result
        new_output = copied.output(value, type_expr=getattr(old_output, "type", None))
        new_output.meta = copy.copy(old_output.meta)
    return copied


# get_attr target -> (the dictionary of the user's module that holds it, its key): Capture.owners
Owners = dict[str, tuple[dict[str, Any], str]]


def eager_forward(
    gm: fx.GraphModule, owners: Optional[Owners] = None, attribute_root: Optional[torch.nn.Module] = None
) -> Callable:
    """`gm`'s forward over its lowered graph, bound to `gm` (same attributes, same calling convention).

    A get_attr target in `owners` is read from the user's module that holds it; any other is looked up
    from `attribute_root` (default `gm`; a block graph reads the slot banks and stores of its variant)."""
    graph, _ = lowered_graph(gm.graph)
    if type(graph._codegen) is _PyTreeCodeGen:
        graph._codegen = _UnpackingCodeGen(graph._codegen.pytree_info)
    code = graph.python_code(root_module="self")
    root = gm if attribute_root is None else attribute_root
    src, global_values = _direct_attribute_reads(root, graph, code.src, dict(code.globals), owners or {})
    return types.MethodType(_forward_from_src(src, global_values), gm)


ATTRIBUTE_PREFIX = "_peftfx_attrs_"  # globals of the eager forward holding the owning modules' dictionaries


def owning_dict(gm: torch.nn.Module, target: str) -> Optional[tuple[dict[str, Any], str]]:
    """(dictionary, key) that `gm.<target>` reads at call time, looked up as `nn.Module.__getattr__`
    does (instance attributes, then parameters, buffers, submodules); None where the read is anything
    else (a class attribute or property), which keeps its chained read."""
    path, _, name = target.rpartition(".")
    try:
        owner = gm.get_submodule(path) if path else gm
    except AttributeError:
        return None
    if name in owner.__dict__:
        return owner.__dict__, name
    if hasattr(type(owner), name):
        return None
    for found in (owner._parameters, owner._buffers, owner._modules):
        if name in found:
            return found, name
    return None


def _direct_attribute_reads(
    gm: torch.nn.Module, graph: fx.Graph, src: str, global_values: dict[str, Any], owners: Owners
) -> tuple[str, dict[str, Any]]:
    """`src` with each get_attr line (`x = self.a.b.w`, as fx writes it) reading `<dict of a.b>["w"]`."""
    names: dict[int, str] = {}  # id(dictionary) -> its global name
    reads: dict[str, str] = {}  # the chained read fx wrote -> the direct one
    for node in graph.find_nodes(op="get_attr"):
        found = owners.get(str(node.target)) or owning_dict(gm, str(node.target))
        if found is None:
            continue
        values, key = found
        name = names.get(id(values))
        if name is None:
            name = names[id(values)] = _unused_name(global_values)
            global_values[name] = values
        reads[_format_target("self", str(node.target))] = f"{name}[{key!r}]"
    lines = []
    for line in src.split("\n"):
        head, sep, rest = line.partition(" = ")
        read, semicolon, tail = rest.partition(";")  # fx appends `;  x = None` after a value's last use
        direct = reads.get(read) if sep else None
        lines.append(head + sep + direct + semicolon + tail if direct is not None else line)
    return "\n".join(lines), global_values


def _unused_name(global_values: dict[str, Any]) -> str:
    index = len(global_values)
    while f"{ATTRIBUTE_PREFIX}{index}" in global_values:
        index += 1
    return f"{ATTRIBUTE_PREFIX}{index}"


class _Unsupported(Exception):
    pass


def _leaves(expression: str, spec: TreeSpec) -> list[str]:
    """Expressions for the leaves `fx_pytree.tree_flatten_spec(<expression>, spec)` returns."""
    if spec.is_leaf():
        return [expression]
    if spec.type in (list, tuple):
        return [leaf for i, child in enumerate(spec.children()) for leaf in _leaves(f"{expression}[{i}]", child)]
    if spec.type is dict:
        return [
            leaf
            for key, child in zip(spec.context, spec.children())
            for leaf in _leaves(f"{expression}[{key!r}]", child)
        ]
    raise _Unsupported(spec.type)


class _UnpackingCodeGen(_PyTreeCodeGen):
    """Export's calling convention written as plain indexing (inputs) and a plain return (a single
    output); any other tree keeps torch's pytree calls."""

    def _input_leaves(self) -> list[str]:
        spec, names = self.pytree_info.in_spec, list(self.pytree_info.orig_args)
        args_kwargs = (
            spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple and spec.child(1).type is dict
        )
        if args_kwargs:  # flattened as ([positional names], {key: name}), as _PyTreeCodeGen writes it
            positional, keywords = spec.child(0), spec.child(1)
            if len(names) != positional.num_children + keywords.num_children:
                raise _Unsupported("argument count")
            pairs = list(zip(names, positional.children()))
            pairs += list(zip(names[positional.num_children :], keywords.children()))
        elif spec.type in (list, tuple) and spec.num_children <= len(names):  # flattened as [names]
            pairs = list(zip(names, spec.children()))
        else:
            raise _Unsupported(spec.type)
        return [leaf for name, child in pairs for leaf in _leaves(name, child)]

    def gen_var_bindings(self, fn_args: list[str], free_vars: list[str], expanded_def: bool) -> str:
        try:
            leaves = self._input_leaves()
        except _Unsupported:
            leaves = []
        if not leaves or len(leaves) != len(free_vars) or "self" in free_vars:
            return super().gen_var_bindings(fn_args, free_vars, expanded_def)
        names = [x.split(":")[0].split("#")[0] for x in free_vars]
        return self._format_annotations(free_vars, expanded_def) + f"\n    {', '.join(names)}, = {', '.join(leaves)},"

    def generate_output(
        self,
        output_args: Any,
        *,
        descs: Any = None,
        repr_fn: Optional[Callable[[object], str]] = None,
    ) -> str:
        spec = self.pytree_info.out_spec
        if spec is not None and spec.is_leaf() and isinstance(output_args, (list, tuple)) and len(output_args) == 1:
            return f"return {(repr_fn or repr)(output_args[0])}"
        return super().generate_output(output_args, descs=descs, repr_fn=repr_fn)
