"""The adapter-method protocol: everything the engine needs to know about one kind of adapter.

A method (LoRA, DoRA, IA3, prompt tuning, prefix tuning) is one module under peftfx/methods/ holding an
`AdapterMethod` subclass, plus its graph pass(es) under passes/. It declares

- which configs it claims (`config_class`, `claims`),
- how it plans sites from a config (`plan`): computed and validated before anything changes,
- how it creates and initialises its tensors in the store (`create`),
- its checkpoint tensors under PEFT's keys (`entries`), which io uses to load, check and save,
- how a merge changes a base weight and how unmerge undoes it (`merge_weight`, `unmerge_weight`),
- its graph passes and where they run (`passes`, `stage`),
- its part of the variant key (`layout`): what a variant graph depends on, not the values,

The engine (peftfx/state/, io.py, merge.py, generate.py, tools/export.py) never branches on a method's
name; it asks the method.
(torchtune's AdapterModule protocol and PT2E's annotate -> validate -> rewrite are the models.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Optional

import torch
from torch import fx, nn

from ..config import AdapterConfig
from ..errors import TargetNotFoundError
from ..rewrite import Pass

if TYPE_CHECKING:
    from ..state.store import AdapterStore

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for tensors inside the wrapped model


@dataclass(frozen=True)
class Entry:
    """One tensor of an adapter checkpoint: its PEFT key, where it lives, and its shape. `read`, when
    set, computes the saved value (a prefix encoder saves its projected table, not a parameter)."""

    peft_key: str
    owner: str  # "store" (adapter tensor) or "base" (a trained base bias)
    path: str
    shape: tuple[int, ...]
    read: Optional[Callable[[], torch.Tensor]] = None


@dataclass
class AdapterPlan:
    """What adding an adapter will create: the method's sites and the shared parts (saved modules,
    trained biases). Made before anything changes, so a bad config or checkpoint changes nothing."""

    name: str
    config: AdapterConfig
    method: "AdapterMethod"
    sites: list[Any] = field(default_factory=list)  # method-specific per-site facts, by site key
    saved_paths: list[str] = field(default_factory=list)  # modules_to_save module paths
    bias_names: list[str] = field(default_factory=list)  # base biases trained and saved (LoRA's bias=)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific (a prompt module, ...)

    @property
    def slots(self) -> list[Any]:
        """The sites (LoRA calls them slots)."""
        return self.sites


@dataclass
class MethodEnv:
    """What the engine hands a method: the user's model, the store and a scratch reference graph."""

    model: nn.Module
    store: "AdapterStore"
    reference_graph: Callable[[], fx.GraphModule]


class AdapterMethod:
    """Base class of a method; subclasses set the class attributes and override what they need."""

    name: ClassVar[str] = ""  # the method's key in variant specs and pass contexts
    peft_type: ClassVar[str] = ""
    config_class: ClassVar[type] = AdapterConfig
    passes: ClassVar[tuple[Pass, ...]] = ()
    stage: ClassVar[str] = "weights"  # "inputs": rewrites inputs/attention (before modules_to_save); "weights"
    can_merge: ClassVar[bool] = False
    can_stack: ClassVar[bool] = False  # several adapters active at once, outputs summed
    can_mix: ClassVar[bool] = False  # one adapter per batch row (adapter_names)
    can_combine: ClassVar[bool] = False  # add_weighted_adapter
    banked: ClassVar[bool] = False  # variant graphs read its tensors through slot banks
    saved_key_prefix: ClassVar[str] = PEFT_PREFIX  # checkpoint key prefix of its modules_to_save tensors

    def claims(self, config: AdapterConfig) -> bool:
        return type(config) is self.config_class

    # -- adding ---------------------------------------------------------------------------------------

    def prepare_config(self, config: AdapterConfig, model: nn.Module, from_checkpoint: bool) -> AdapterConfig:
        """The config as it will be stored (model-dependent fields filled in); raises if it cannot apply."""
        return config

    def plan(self, env: MethodEnv, name: str, config: AdapterConfig) -> AdapterPlan:
        raise NotImplementedError

    def entries(self, env: MethodEnv, plan: AdapterPlan) -> list[Entry]:
        """The method's own checkpoint tensors (saved modules and biases are added by io)."""
        return []

    def create(self, env: MethodEnv, plan: AdapterPlan) -> None:
        """Create and initialise the plan's tensors in the store (requires_grad set by the engine)."""

    # -- variants -------------------------------------------------------------------------------------

    def layout(self, store: "AdapterStore", adapter: str) -> tuple[Any, ...]:
        """What a graph depends on about an adapter (sites, ranks, dtypes), not the values."""
        return ()

    def before_run(self, store: "AdapterStore", adapters: tuple[str, ...], training: bool) -> None:
        """Called before a variant serving `adapters` (of this method) runs: a method may refresh tensors
        its eval graph reads as constants (DoRA's weight-norm scale, when A, B, m or W changed since)."""

    def call_inputs(
        self, store: "AdapterStore", adapter: str, named: dict[str, Any], model: nn.Module
    ) -> Optional[tuple[dict[str, Any], dict[str, Any], str]]:
        """For methods that capture the base graph with other inputs than the user's (virtual tokens):
        (inputs to capture with, inputs to call the variant with, the user's token input name); None
        for methods that use the user's inputs as they are."""
        return None

    def decode_plan(self, store: "AdapterStore", adapter: str, model: nn.Module) -> dict[str, Any]:
        """How generate feeds this adapter to the decode graph itself (peftfx/generate.py's _Plan fields);
        only methods of the "inputs" stage have one."""
        raise NotImplementedError(f"{type(self).__name__} has no decode plan")

    # -- merging --------------------------------------------------------------------------------------

    def merge_sites(self, store: "AdapterStore", adapter: str) -> Iterable[Any]:
        """The sites whose base weight a merge changes."""
        return ()

    def merge_weight(
        self, store: "AdapterStore", adapter: str, site: Any, weight: torch.Tensor, cache: dict[str, Any]
    ) -> torch.Tensor:
        """The merged weight of one site (the weight in its own layout); may keep what unmerge needs in `cache`."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge")

    def unmerge_weight(
        self, store: "AdapterStore", adapter: str, site: Any, weight: torch.Tensor, cache: dict[str, Any]
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot unmerge")

    def weight_path(self, site: Any) -> str:
        """The base parameter a site's merge changes."""
        return str(site.weight_path)


def modules_to_save_paths(model: torch.nn.Module, config: Any) -> list[str]:
    """Module paths ending in a modules_to_save name (PEFT's rule). PEFT writes the task heads of
    every architecture (classifier and score), so only a list that matches nothing is an error."""
    wanted = config.resolved_modules_to_save()
    module_names = [n for n, _ in model.named_modules() if n]
    found = [n for n in module_names if any(n == w or n.endswith(f".{w}") for w in wanted)]
    if wanted and not found and config.modules_to_save:
        raise TargetNotFoundError(
            f"modules_to_save={config.modules_to_save!r} matches no module of {type(model).__name__}; "
            f"top-level modules: {[n for n in module_names if '.' not in n]}."
        )
    return [n for n in found if not any(n.startswith(p + ".") for p in found)]
