"""Adding and removing keyword inputs of an exported GraphModule, keeping its pytree calling convention.

Exported graphs take `(args, kwargs)` flattened by an input spec; a pass that changes what a graph
takes (a row index for mixed batches, token ids in place of embeddings) must change the placeholders,
the codegen's argument list and the spec together.
"""

from __future__ import annotations

from typing import Any, cast

from torch import fx
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree


def _codegen(gm: fx.GraphModule) -> _PyTreeCodeGen:
    """An exported graph's codegen, which keeps the pytree calling convention."""
    return cast(_PyTreeCodeGen, gm.graph._codegen)


def _keyword_structure(gm: fx.GraphModule) -> dict[str, Any]:
    """The keyword inputs as the spec nests them, with 0 for every tensor (a list input stays a list)."""
    in_spec = _codegen(gm).pytree_info.in_spec
    return cast("dict[str, Any]", pytree.tree_unflatten([0] * in_spec.num_leaves, in_spec)[1])


def _set_inputs(gm: fx.GraphModule, structure: dict[str, Any], orig_args: list[str]) -> None:
    codegen = _codegen(gm)
    _, in_spec = pytree.tree_flatten(((), structure))
    codegen.pytree_info = codegen.pytree_info._replace(orig_args=orig_args, in_spec=in_spec)
    gm._in_spec = in_spec


def keyword_inputs(gm: fx.GraphModule) -> list[str]:
    return list(_codegen(gm).pytree_info.in_spec.child(1).context)


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    """The placeholder of keyword input `name`, a single tensor (inputs flatten in key order)."""
    structure = _keyword_structure(gm)
    keys = list(structure)
    before = sum(len(pytree.tree_leaves(structure[key])) for key in keys[: keys.index(name)])
    placeholders: list[fx.Node] = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return placeholders[before]


def add_keyword_input(gm: fx.GraphModule, name: str) -> fx.Node:
    """Append a keyword input (one tensor); returns its placeholder."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    info = _codegen(gm).pytree_info
    _set_inputs(gm, {**_keyword_structure(gm), name: 0}, list(info.orig_args) + [name])
    return node


def remove_keyword_input(gm: fx.GraphModule, name: str) -> None:
    """Drop a keyword input (one tensor) whose placeholder no longer has users."""
    node = placeholder(gm, name)
    if node.users:
        raise ValueError(f"input {name!r} is still read by {list(node.users)}")
    structure = _keyword_structure(gm)
    orig_args = list(_codegen(gm).pytree_info.orig_args)
    del orig_args[list(structure).index(name)]
    del structure[name]
    gm.graph.erase_node(node)
    _set_inputs(gm, structure, orig_args)
