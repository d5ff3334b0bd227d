"""The rewrite layer: everything a pass may import.

Patterns with captures (`patterns`), the Builder every edit goes through (`builder`), passes as rule
tables and their runner (`passes`), typed node annotations (`annotations`), the names variant graphs
share with the engine (`layout`), keyword-input edits (`graph_inputs`) and the pass context (`context`).
Passes import only this package (and peftfx.errors); the engine imports passes.
"""

from .annotations import Annotation, Provenance, Site, annotation, made_by, mark_site, provenance_of, site_of
from .builder import Builder, read_tensor
from .context import PassContext, served_site
from .layout import LINEAR_OPS, MOUNT, QUANT_MOUNT, SLOTS, slot_path, store_path
from .passes import Pass, Rule, run_pass
from .patterns import ANY, ATTR, INPUT, Captures, Match, P, Pattern

__all__ = [
    "Annotation",
    "Provenance",
    "Site",
    "annotation",
    "made_by",
    "mark_site",
    "provenance_of",
    "site_of",
    "Builder",
    "read_tensor",
    "PassContext",
    "served_site",
    "LINEAR_OPS",
    "MOUNT",
    "QUANT_MOUNT",
    "SLOTS",
    "slot_path",
    "store_path",
    "Pass",
    "Rule",
    "run_pass",
    "ANY",
    "ATTR",
    "INPUT",
    "Captures",
    "Match",
    "P",
    "Pattern",
]
