"""Blocks: a variant graph run as a top graph calling one block graph per layer, through the user's layer.

A captured graph is one flat program: it never calls the model's submodules, so nothing that hangs on
a module runs. transformers' gradient checkpointing wraps each decoder layer's call (export drops it),
FSDP2 all-gathers a layer's shards in that layer's forward pre-hook, and `enable_input_require_grads`
is a forward hook on the input embeddings. `lower` cuts the variant graph at those modules: each
repeated layer (the children of a model's layer lists) and the input embedding become a block
GraphModule, the nodes whose `nn_module_stack` lies under that module, and the top graph calls it as a
`BlockCall`. A block call goes through the user's own module: with hooks on it (FSDP2's, a user's)
it runs as that module's `forward` inside `nn.Module.__call__`, so they fire around it; inside, it runs
under activation checkpointing when the layer asks for it (`checkpoint_for`).

Every parameter and buffer a block or the top graph reads is read at call time from the dictionary of
the user's module that held it when it was captured (`Capture.owners`), not from the capture's copy of
the module tree: FSDP2 swaps a layer's parameters for sharded ones and, inside its hooks, for the
gathered ones, and the graphs must read whichever is there.

Lowering happens after the passes, for running only: `pm.graph_module`, export and the visualizer see
the flat graph the passes wrote; `ModelState.block_calls` shows the blocks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import fx, nn
from torch.fx.passes.tools_common import stable_topological_sort
from torch.fx.passes.utils.fuser_utils import erase_nodes, fuse_as_graphmodule, insert_subgm, validate_partition

from . import io
from .bindings import Owners, copy_graph, eager_forward
from .checkpointing import Checkpointing, checkpoint_for
from .regional import BlockCompiler

BLOCK_PREFIX = "peftfx_block_"


def block_paths(model: nn.Module) -> tuple[list[str], list[str]]:
    """(input embedding paths, layer paths): the module paths that become blocks. Layers are the children
    of the model's layer lists (a ModuleList of at least two children of one class, outermost only: MoE
    expert lists inside a layer stay in their layer)."""
    (input_embedding, _), _ = io.embedding_modules(model)
    lists: dict[str, int] = {}  # layer list path -> its length
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1 or any(name.startswith(p + ".") for p in lists):
            continue
        lists[name] = len(module)
    layers = [f"{name}.{index}" for name, length in lists.items() for index in range(length)]
    return io.module_paths(model, [input_embedding])[:1], layers


def _node_path(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return str(list(stack.values())[-1][0])


def _owner(path: Optional[str], roots: list[str]) -> Optional[str]:
    if not path:
        return None
    for root in roots:
        if path == root or path.startswith(root + "."):
            return root
    return None


def _partitions(gm: fx.GraphModule, paths: list[str]) -> dict[str, list[fx.Node]]:
    """Nodes of each block, in graph order: the calls whose innermost module lies under its path, and
    the get_attr nodes only those calls read."""
    found: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            owner = _owner(_node_path(node), paths)
            if owner is not None:
                found.setdefault(owner, []).append(node)
    members = {node: owner for owner, nodes in found.items() for node in nodes}
    for node in gm.graph.find_nodes(op="get_attr"):
        owners = {members.get(user) for user in node.users}
        if len(owners) == 1 and None not in owners:
            owner = next(iter(owners))
            assert owner is not None
            members[node] = owner
            found[owner].append(node)
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    return {owner: sorted(nodes, key=order.__getitem__) for owner, nodes in found.items()}


def lower(
    gm: fx.GraphModule,
    model: nn.Module,
    owners: Owners,
    checkpointing: Checkpointing,
    training: bool,
    compiler: Optional[BlockCompiler] = None,
) -> tuple[Callable[..., Any], dict[str, "BlockCall"]]:
    """(callable running `gm` as a top graph over block calls, the block calls by module path).

    With `compiler` (pm.compile()), each layer block runs its structure's compiled function
    (peftfx/regional.py); the top graph and the embedding block run eagerly either way.

    `gm` is left as it is: the top graph is a copy. A block whose nodes cannot be cut out without a cycle
    (a value of the layer read before the layer ends) stays in the top graph."""
    top = fx.GraphModule(gm, copy_graph(gm.graph))
    top.validate_inputs = False  # type: ignore[assignment]  # export's flag; sizes were checked already
    embeddings, layers = block_paths(model)
    checkpointing.layers = len(layers)
    ordinal = {path: index for index, path in enumerate(layers)}
    calls: dict[str, BlockCall] = {}
    for number, (path, nodes) in enumerate(_partitions(top, embeddings + layers).items()):
        if not any(n.op != "get_attr" for n in nodes) or not validate_partition(nodes):
            continue
        name = f"{BLOCK_PREFIX}{number}"
        sub, inputs, outputs = fuse_as_graphmodule(top, nodes, name, dict.fromkeys(nodes))
        if not outputs:
            continue
        insert_subgm(top, sub, inputs, outputs, nodes[-1])
        erase_nodes(top, nodes)
        if compiler is None or path not in ordinal:  # the embedding block is one lookup: eager
            run = eager_forward(sub, owners=owners, attribute_root=gm)
        else:
            run = compiler.runner(sub, owners, gm)
        layer = model.get_submodule(path)
        call = BlockCall(path, sub, run, layer, checkpointing, training, ordinal.get(path))
        top._modules[name] = call
        calls[path] = call
    stable_topological_sort(top)
    top.graph.lint()
    top.recompile()
    return eager_forward(top, owners=owners, attribute_root=gm), calls


class BlockCall(nn.Module):
    """One block of the top graph: runs its block graph as the user's module `layer`, hooks included,
    under the checkpointing `layer` asks for. `layer` is kept out of the module tree (not registered):
    the top graph is not a second owner of the user's parameters."""

    def __init__(
        self,
        path: str,
        graph_module: fx.GraphModule,
        run: Callable[..., Any],
        layer: nn.Module,
        checkpointing: Checkpointing,
        training: bool,
        index: Optional[int],
    ) -> None:
        super().__init__()
        self.path = path
        self.graph_module = graph_module
        self.__dict__["run"] = run
        self.__dict__["layer"] = layer
        self.__dict__["checkpointing"] = checkpointing
        self.training_graph = training
        self.index = index  # position among the layer blocks; None for the embedding

    def __call__(self, *args: Any) -> Any:  # skips nn.Module's call machinery: this module has no hooks
        layer: nn.Module = self.__dict__["layer"]
        if _has_hooks(layer):
            with _forward_as(layer, self._body):
                return nn.Module.__call__(layer, *args)
        return self._body(*args)

    def _body(self, *args: Any) -> Any:
        wrap = checkpoint_for(self.__dict__["layer"], self.__dict__["checkpointing"], self.training_graph, self.index)
        run = self.__dict__["run"]
        return run(*args) if wrap is None else wrap(run, *args)

    def forward(self, *args: Any) -> Any:
        return self(*args)


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or torch.nn.modules.module._global_forward_pre_hooks
        or torch.nn.modules.module._global_forward_hooks
    )


@contextlib.contextmanager
def _forward_as(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """`module.forward` is `forward` for the block (an instance attribute shadows the class's)."""
    previous = module.__dict__.get("forward")
    module.__dict__["forward"] = forward
    try:
        yield
    finally:
        if previous is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = previous
