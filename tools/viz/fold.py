"""Folding repeated blocks: a 32-layer model is drawn as layer 0 plus "layers 1–31 same as layer 0".

Sameness is structural, not by name: the subgraph of each block (its nodes labelled by op, target and
module path relative to the block, plus any adapter provenance and diff status; its internal edges) is
hashed with networkx's Weisfeiler-Lehman graph hash. Blocks with equal hashes fold into the first.
So a block whose adapter differs (e.g. `layers_to_transform=[0, 2]`) stays drawn.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import networkx as nx

from .graph import VizGraph, VizNode


@dataclass(frozen=True)
class Fold:
    """Blocks `container.<i>` for i in `members` are the same as `container.<kept>` and not drawn."""

    container: str  # module path of the block list, e.g. "model.layers"
    kept: int
    members: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"f-{self.path(self.kept)}"

    def path(self, index: int) -> str:
        return f"{self.container}.{index}" if self.container else str(index)

    def member_paths(self) -> list[str]:
        return [self.path(i) for i in self.members]

    def text(self) -> str:
        """e.g. "layers 1–31 same as layer 0"."""
        name = self.container.rsplit(".", 1)[-1] or "blocks"
        one = name[:-1] if name.endswith("s") and len(name) > 1 else name
        many = name if len(self.members) > 1 else one
        return f"{many} {format_ranges(self.members)} same as {one} {self.kept}"


def format_ranges(indices: tuple[int, ...]) -> str:
    """(1, 2, 3, 5) -> "1–3, 5" (en dash, as in the issue's wording)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs)


def parse_ranges(text: str) -> list[int]:
    """Inverse of format_ranges (tests and tools read fold notes back)."""
    out: list[int] = []
    for part in re.split(r",\s*", text.strip()):
        a, _, b = part.partition("–")
        out += list(range(int(a), int(b or a) + 1))
    return out


def _within(module: str, path: str) -> bool:
    return module == path or module.startswith(path + ".")


def _block_hash(nodes: list[VizNode], names: set[str], edges: list[tuple[str, str]], path: str) -> str:
    graph = nx.DiGraph()
    prefix = path + "."
    for n in nodes:
        relative = n.module[len(path) :]
        # an attribute's full path names its block (in any spelling: a.0.b, a_0_b); its short label does not
        target = n.label if n.op == "get_attr" else n.target.replace(prefix, "<block>.")
        graph.add_node(n.name, label=f"{n.op}|{target}|{relative}|{n.pass_name}|{n.adapter}|{n.status}")
    graph.add_edges_from((s, d) for s, d in edges if s in names and d in names)
    with warnings.catch_warnings():  # networkx 3.5 warns that directed hashes changed; we compare within a run
        warnings.simplefilter("ignore", UserWarning)
        return nx.weisfeiler_lehman_graph_hash(graph, node_attr="label", iterations=3, digest_size=16)


def find_folds(graph: VizGraph) -> list[Fold]:
    """Folds for every module list (a path component that is an integer) whose blocks repeat.
    Outer lists are handled first; lists inside a folded block are not looked at again."""
    blocks: dict[str, dict[int, list[VizNode]]] = {}
    for node in graph.nodes.values():
        parts = node.module.split(".") if node.module else []
        for k, part in enumerate(parts):
            if part.isdigit():
                blocks.setdefault(".".join(parts[:k]), {}).setdefault(int(part), []).append(node)
    folds: list[Fold] = []
    folded_paths: list[str] = []
    for container in sorted(blocks, key=lambda c: (c.count(".") if c else -1, c)):
        members = blocks[container]
        if len(members) < 2 or any(_within(container, p) for p in folded_paths):
            continue
        by_hash: dict[str, list[int]] = {}
        for index in sorted(members):
            nodes = members[index]
            names = {n.name for n in nodes}
            edges = [(s, d) for s, d in graph.edges if s in names or d in names]
            path = f"{container}.{index}" if container else str(index)
            by_hash.setdefault(_block_hash(nodes, names, edges, path), []).append(index)
        for indices in by_hash.values():
            if len(indices) > 1:
                fold = Fold(container, indices[0], tuple(indices[1:]))
                folds.append(fold)
                folded_paths += fold.member_paths()
    return folds
