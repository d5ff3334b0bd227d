"""Adding and removing keyword inputs of an exported GraphModule, keeping its pytree calling convention.

Exported graphs take `(args, kwargs)` flattened by an input spec; a pass that changes what a graph
takes (a row index for mixed batches, token ids in place of embeddings) must change the placeholders,
the codegen's argument list and the spec together.
"""
from __future__ import annotations

from torch import fx
from torch.utils import _pytree as pytree


def _set_keys(gm: fx.GraphModule, keys: list[str], orig_args: list[str]) -> None:
    codegen = gm.graph._codegen
    _, in_spec = pytree.tree_flatten(((), {k: 0 for k in keys}))
    codegen.pytree_info = codegen.pytree_info._replace(orig_args=orig_args, in_spec=in_spec)
    gm._in_spec = in_spec


def keyword_inputs(gm: fx.GraphModule) -> list[str]:
    return list(gm.graph._codegen.pytree_info.in_spec.child(1).context)


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    """The placeholder of keyword input `name` (inputs flatten in key order, one leaf each)."""
    keys = keyword_inputs(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return placeholders[keys.index(name)]


def add_keyword_input(gm: fx.GraphModule, name: str) -> fx.Node:
    """Append a keyword input; returns its placeholder."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(name)
    info = gm.graph._codegen.pytree_info
    _set_keys(gm, keyword_inputs(gm) + [name], list(info.orig_args) + [name])
    return node


def remove_keyword_input(gm: fx.GraphModule, name: str) -> None:
    """Drop a keyword input whose placeholder no longer has users."""
    node = placeholder(gm, name)
    if node.users:
        raise ValueError(f"input {name!r} is still read by {list(node.users)}")
    keys = keyword_inputs(gm)
    orig_args = list(gm.graph._codegen.pytree_info.orig_args)
    index = keys.index(name)
    gm.graph.erase_node(node)
    del orig_args[index]
    keys.remove(name)
    _set_keys(gm, keys, orig_args)
