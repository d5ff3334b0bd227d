"""Regional compilation: `pm.compile()` compiles each block structure once and every layer reuses it.

Compiling a variant's flat graph traces every layer: the first call of a 32-layer model costs about
eight times a 4-layer one's. Here the top graph runs eagerly and each block graph (peftfx/blocks.py)
becomes a function of its tensors: every `get_attr` is turned into a leading input, read at call time
from where the eager block would read it (the user's module, or the variant's slot banks). Blocks whose
graphs are the same op for op (the layers of one structure with the same adapters on them) then share
one `torch.compile`d function, fed each layer's own tensors: dynamo traces one layer, and calling it for
the next layer is a guard check. Block calls keep their hooks and activation checkpointing (a
checkpoint recomputes the compiled function), so FSDP2 and `pm.checkpointing()` work compiled too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx
from torch.fx.experimental import _config as fx_config

from .bindings import Owners, copy_graph, owning_dict


class BlockCompiler:
    """The compiled functions of one model's blocks, by block structure (see `structure_key`). They hold
    no tensors (each call reads them), so they outlive the variants: a variant built again after `.to()`
    or a new capture reuses the compiled function of its structure (dynamo's guards decide)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self._compiled: dict[tuple, Callable[..., Any]] = {}

    def runner(self, block: fx.GraphModule, owners: Owners, attribute_root: torch.nn.Module) -> Callable[..., Any]:
        """`block`'s forward, compiled, reading its tensors at each call."""
        functional, reads = as_function_of_tensors(block, owners, attribute_root)
        key = structure_key(functional.graph)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = torch.compile(functional, **self.options)

        def run(*args: Any) -> Any:
            # No duck shaping: a block takes rotary tables [1, seq, head_dim] as inputs, and where the
            # sequence length equals head_dim, duck shaping would give both one symbol and then tie the
            # sequence length to head_dim's constant (a recompile at the next length).
            previous = fx_config.use_duck_shape
            fx_config.use_duck_shape = False
            try:
                return compiled(*[read() for read in reads], *args)
            finally:
                fx_config.use_duck_shape = previous

        return run


def as_function_of_tensors(
    block: fx.GraphModule, owners: Owners, attribute_root: torch.nn.Module
) -> tuple[fx.GraphModule, list[Callable[[], Any]]]:
    """(`block` with each get_attr turned into a leading placeholder, the readers of those tensors in
    order). Exported graphs call functions only (no call_module), so nothing else reads the module."""
    graph = copy_graph(block.graph)
    reads: list[Callable[[], Any]] = []
    first = next(node for node in graph.nodes if node.op != "get_attr")  # stays while get_attrs go
    for index, node in enumerate(graph.find_nodes(op="get_attr")):
        reads.append(_reader(str(node.target), owners, attribute_root))
        with graph.inserting_before(first):
            placeholder = graph.placeholder(f"tensor_{index}")
        placeholder.meta = dict(node.meta)
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
    return fx.GraphModule(torch.nn.Module(), graph), reads


def _reader(target: str, owners: Owners, root: torch.nn.Module) -> Callable[[], Any]:
    """A call-time read of `root.<target>`: from the dictionary that holds it (a parameter the user or
    FSDP2 swaps, a slot bank's rebound adapter), else through the attribute chain."""
    found = owners.get(target) or owning_dict(root, target)
    if found is not None:
        values, key = found
        return lambda: values[key]
    parts = target.split(".")

    def read() -> Any:
        value: Any = root
        for part in parts:
            value = getattr(value, part)
        return value

    return read


def structure_key(graph: fx.Graph) -> tuple:
    """The graph op for op, with values named by position: equal for two blocks that compute the same
    function of their inputs (node names, which differ per layer, are left out)."""
    index: dict[fx.Node, int] = {}
    parts = []
    for position, node in enumerate(graph.nodes):
        index[node] = position

        def ref(arg: fx.Node) -> str:
            return f"%{index[arg]}"

        args = fx.node.map_arg(node.args, ref)
        kwargs = fx.node.map_arg(node.kwargs, ref)
        target = "" if node.op == "placeholder" else _name(node.target)
        parts.append((node.op, target, repr(args), repr(sorted(kwargs.items()))))
    return tuple(parts)


def _name(target: Any) -> str:
    if isinstance(target, (str, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', None) or target}"
