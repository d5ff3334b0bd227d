"""Typed node annotations: the one writer and reader of `node.meta["peftfx"]`.

Two facts live on nodes. Selection marks the ops an adapter can target (`Site`), and every node a pass
inserts or retargets carries where it came from (`Provenance`). The visualizer, the demo and the tests
read both through the functions below, never through the raw dict key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from torch import fx

META_KEY = "peftfx"


@dataclass(frozen=True)
class Site:
    """A targetable op: the module path PEFT would name it by and where its weight lives."""

    key: str
    weight: str
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class Provenance:
    """Which pass and rule made a node, for which adapter, next to which original node."""

    pass_name: str
    rule: str
    adapter: Optional[str]
    anchor: str

    @property
    def qualified(self) -> str:
        """`<pass>.<rule>`, the name docs/passes.md and the visualizer use."""
        return f"{self.pass_name}.{self.rule}"


@dataclass(frozen=True)
class Annotation:
    """Everything peftfx records on one node."""

    site: Optional[Site] = None
    provenance: Optional[Provenance] = None


def annotation(node: fx.Node) -> Annotation:
    value = node.meta.get(META_KEY)
    return value if isinstance(value, Annotation) else Annotation()


def site_of(node: fx.Node) -> Optional[Site]:
    return annotation(node).site


def provenance_of(node: fx.Node) -> Optional[Provenance]:
    return annotation(node).provenance


def made_by(node: fx.Node, name: str) -> bool:
    """Whether the pass `name` ("lora") or the rule `name` ("lora.linear") made the node."""
    made = provenance_of(node)
    return made is not None and name in (made.pass_name, made.qualified)


def mark_site(node: fx.Node, site: Site) -> None:
    node.meta[META_KEY] = replace(annotation(node), site=site)


def stamp(node: fx.Node, provenance: Provenance) -> None:
    node.meta[META_KEY] = replace(annotation(node), provenance=provenance)
