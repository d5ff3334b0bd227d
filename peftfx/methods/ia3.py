"""IA3 ((IA)^3, PEFT's IA3Config / IA3Model): a learned vector `ia3_l` per targeted linear op.

Feed-forward sites scale the input, `y = W (x * l) + b` with l of shape (1, in_features); other sites
scale the output, `y = (W x + b) * l` with l of shape (out_features, 1). Several active adapters multiply
their vectors (PEFT's ia3_scaling). Sites are linear ops chosen by PEFT's matching rules
(peftfx/select.py); a site is feed-forward by PEFT's rule (`feedforward_modules`: a regex fullmatch, or a
list of names the module path ends with). The vectors live in the store as PEFT lays them out
(`<key>.ia3_l.<adapter>`, a ParameterDict) and are saved as `base_model.model.<key>.ia3_l`; the graph math
is passes/ia3.py. Merging scales W's columns (feed-forward) or W's rows and the bias; unmerge divides by
`l + 1e-8`, as PEFT does.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Optional, Union, cast

import torch
from torch import nn

from peftfx.passes import ia3 as ia3_pass

from .. import select
from ..config import ALL_LINEAR, AdapterConfig, register_config
from ..errors import ConfigError
from .base import PEFT_PREFIX, AdapterMethod, AdapterPlan, Entry, MethodEnv, modules_to_save_paths

if TYPE_CHECKING:
    from ..state.store import AdapterStore

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / _FEEDFORWARD_MODULES_MAPPING (peft/utils/constants.py)
DEFAULT_IA3_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

UNMERGE_EPS = 1e-8  # PEFT's "tolerance to avoid division by zero" when unmerging


# -- config ----------------------------------------------------------------------------------------------


@register_config
@dataclass
class IA3Config(AdapterConfig):
    """IA3 hyper-parameters; same names, defaults and meaning as `peft.IA3Config`."""

    PEFT_TYPE: ClassVar[str] = "IA3"

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            if isinstance(getattr(self, name), (set, tuple, frozenset)):
                setattr(self, name, sorted(getattr(self, name)))
        super().__post_init__()

    def validate(self) -> None:
        """Refuse what PEFT refuses or what has no meaning, with the fix in the message."""
        super().validate()
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"IA3Config.{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            _check_names(name, getattr(self, name), regex=True)
        _check_names("modules_to_save", self.modules_to_save, regex=False)
        if self.feedforward_modules == ALL_LINEAR:
            raise ConfigError(
                "IA3Config.feedforward_modules='all-linear' is not a module list; give the names of "
                "the feed-forward modules (e.g. ['down_proj']) or a regex of their paths."
            )
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(feedforward, list):
            # PEFT requires a subset by name. Names that can select a targeted module pass here too: PEFT
            # itself saves such configs (all-linear expanded to full paths, or its model-type defaults).
            extra = sorted(f for f in set(feedforward) if not any(_may_overlap(f, t) for t in targets))
            if extra:
                raise ConfigError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules (as in PEFT), but "
                    f"{extra} select no targeted module; add them to target_modules or remove them "
                    "from feedforward_modules."
                )


def _check_names(field_name: str, value: Any, regex: bool) -> None:
    """None, a list of module names, or (for regex fields) one regex string."""
    if value is None:
        return
    if isinstance(value, str) and regex:
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(
                    f"IA3Config.{field_name}={value!r} is not a valid regular expression ({exc}); "
                    "escape special characters such as '.' '(' '[' or give a list of names."
                ) from None
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"IA3Config.{field_name} must be a list of module names"
            f"{' or a regex string' if regex else ''}, got {value!r}."
        )


def _may_overlap(feedforward: str, target: str) -> bool:
    """Whether some module path targeted by the name `target` (the path itself, or one ending in
    '.target') ends with `feedforward` (PEFT's feed-forward rule)."""
    return target.endswith(feedforward) or feedforward.endswith("." + target)


def is_feedforward(key: str, feedforward_modules: Union[list[str], str]) -> bool:
    """PEFT's _check_target_module_feedforward: a regex fullmatch of the path, or a name it ends with
    (plain `endswith`, no '.' boundary, as PEFT has it)."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, key) is not None
    return any(key.endswith(name) for name in feedforward_modules)


def _default_feedforward(targets: Union[list[str], str], defaults: list[str]) -> Union[list[str], str]:
    """The feed-forward names stored for a config that gave target_modules but not feedforward_modules.

    PEFT stores the model type's default names as they are; when they are not a subset of the given
    target_modules, the config PEFT saves fails to load again (PEFT's own subset check). Stored here is
    what selects the same sites and loads in both: the defaults when they are a subset (or the targets a
    regex), else the targets that PEFT's rule makes feed-forward, else a regex equal to PEFT's rule."""
    if isinstance(targets, str) or set(defaults) <= set(targets):
        return list(defaults)
    whole = [t for t in targets if any(t.endswith(d) for d in defaults)]
    # a target some of whose paths end with a default name and some not ('c_proj' vs 'mlp.c_proj')
    partial = any(d.endswith("." + t) for t in targets for d in defaults if t not in whole)
    if not partial:
        return whole
    return ".*(?:" + "|".join(re.escape(d) for d in defaults) + ")"


# -- method ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IA3Site:
    """What the IA3 pass and merge need to know about one adapted site of one adapter."""

    key: str
    feedforward: bool
    in_features: int
    out_features: int
    fan_in_fan_out: bool
    weight_path: str
    bias_path: Optional[str]

    @property
    def shape(self) -> tuple[int, int]:
        """PEFT's ia3_l shape: (1, in) for feed-forward sites, else (out, 1)."""
        return (1, self.in_features) if self.feedforward else (self.out_features, 1)


@dataclass(frozen=True)
class IA3BiasStep:
    """A merge step for the bias of a non-feed-forward site (PEFT scales it with the output)."""

    site: IA3Site

    @property
    def key(self) -> str:
        return self.site.key


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """PEFT's autocast_adapter_dtype: half-precision bases get float32 vectors."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def ia3_path(key: str, adapter: str) -> str:
    """The store path of a site's vector (AdapterStore.add_site_parameter's layout)."""
    return f"{key}.ia3_l.{adapter}"


class IA3(AdapterMethod):
    name = "ia3"
    peft_type = "IA3"
    config_class = IA3Config
    passes = (ia3_pass.PASS,)
    can_merge = can_stack = can_mix = banked = True
    can_combine = False  # the engine's add_weighted_adapter combines LoRA factors only

    # -- adding ---------------------------------------------------------------------------------------

    def prepare_config(self, config: Any, model: nn.Module, from_checkpoint: bool) -> Any:
        """PEFT's _prepare_adapter_config: model-type defaults for target_modules and feedforward_modules
        (stored in the config, and so in adapter_config.json, as PEFT does)."""
        config = copy.copy(config)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None:
            if model_type not in DEFAULT_IA3_TARGETS:
                raise ConfigError(
                    f"IA3Config.target_modules is not set and there is no IA3 default for model type "
                    f"{model_type!r}; set target_modules (e.g. ['k_proj', 'v_proj', 'down_proj']) and "
                    "feedforward_modules (e.g. ['down_proj'], or [] for none)."
                )
            config.target_modules = list(DEFAULT_IA3_TARGETS[model_type])
        if config.feedforward_modules is None:
            if model_type not in DEFAULT_IA3_FEEDFORWARD:
                raise ConfigError(
                    f"IA3Config.feedforward_modules is not set and there is no IA3 default for model "
                    f"type {model_type!r}; set feedforward_modules to the targets that scale their "
                    "input (e.g. ['down_proj']), or [] for none."
                )
            config.feedforward_modules = _default_feedforward(
                config.target_modules, DEFAULT_IA3_FEEDFORWARD[model_type]
            )
        return config

    def plan(self, env: MethodEnv, name: str, config: Any) -> AdapterPlan:
        sites = select.linear_sites(env.reference_graph(), env.model)
        chosen = select.resolve_targets(sites, config, env.model, defaults=DEFAULT_IA3_TARGETS)
        existing = {
            key: site
            for adapter, by_key in env.store.sites.items()
            if adapter != name
            for key, site in by_key.items()
            if isinstance(site, IA3Site)
        }
        planned, overridden = [], []
        for site in chosen:
            feedforward = is_feedforward(site.key, config.feedforward_modules)
            if site.key in existing and existing[site.key].feedforward != feedforward:
                # PEFT keeps one mode per layer: the adapter that wrapped it first decides (IA3Layer.is_feedforward)
                feedforward = existing[site.key].feedforward
                overridden.append(site.key)
            planned.append(
                IA3Site(
                    site.key,
                    feedforward,
                    site.in_features,
                    site.out_features,
                    site.fan_in_fan_out,
                    site.weight_path,
                    site.bias_path,
                )
            )
        if overridden:
            warnings.warn(
                f"IA3 adapter {name!r}: {overridden[:3]}{' ...' if len(overridden) > 3 else ''} already "
                "carry an IA3 adapter of the other feed-forward mode; as in PEFT, a layer keeps the mode "
                "of its first adapter, so feedforward_modules is not followed there.",
                UserWarning,
                stacklevel=6,
            )
        config = _with_fan_in_fan_out(config, planned)
        saved = modules_to_save_paths(env.model, config)
        return AdapterPlan(name, config, self, planned, saved, [])

    def entries(self, env: MethodEnv, plan: AdapterPlan) -> list[Entry]:
        return [
            Entry(f"{PEFT_PREFIX}{site.key}.ia3_l", "store", ia3_path(site.key, plan.name), site.shape)
            for site in plan.sites
        ]

    def create(self, env: MethodEnv, plan: AdapterPlan) -> None:
        params = dict(env.model.named_parameters())
        identity = cast(IA3Config, plan.config).init_ia3_weights
        for site in plan.sites:
            weight = params[site.weight_path]
            dtype = adapter_dtype(weight)
            env.store.add_site(plan.name, site.key, site)
            if identity:
                value = torch.ones(site.shape, dtype=dtype, device=weight.device)
            else:  # PEFT keeps its torch.randn start (a non-identity adapter)
                value = torch.randn(site.shape).to(device=weight.device, dtype=dtype)
            env.store.add_site_parameter(plan.name, site.key, "ia3_l", "l", nn.Parameter(value))

    # -- variants -------------------------------------------------------------------------------------

    def layout(self, store: "AdapterStore", adapter: str) -> tuple:
        return tuple(
            (s.key, s.feedforward, str(store.site_tensor(adapter, s.key, "l").dtype))
            for s in store.sites.get(adapter, {}).values()
        )

    # -- merging --------------------------------------------------------------------------------------

    def merge_sites(self, store: "AdapterStore", adapter: str) -> Iterable[Any]:
        """Each site's weight, and the bias of non-feed-forward sites (scaled with the output)."""
        for site in store.sites.get(adapter, {}).values():
            yield site
            if not site.feedforward and site.bias_path:
                yield IA3BiasStep(site)

    def weight_path(self, site: Any) -> str:
        # a bias step is made only for a site with a bias (merge_sites)
        return cast(str, site.site.bias_path) if isinstance(site, IA3BiasStep) else site.weight_path

    def merge_weight(
        self, store: "AdapterStore", adapter: str, site: Any, weight: torch.Tensor, cache: dict[str, Any]
    ) -> torch.Tensor:
        return torch.mul(weight, _factor(store, adapter, site, weight)).to(weight.dtype)

    def unmerge_weight(
        self, store: "AdapterStore", adapter: str, site: Any, weight: torch.Tensor, cache: dict[str, Any]
    ) -> torch.Tensor:
        return torch.div(weight, _factor(store, adapter, site, weight) + UNMERGE_EPS).to(weight.dtype)


def _factor(store: "AdapterStore", adapter: str, step: Any, weight: torch.Tensor) -> torch.Tensor:
    """The vector laid out against the weight (PEFT's transpose(ia3_l, fan_in_fan_out)), or the bias's shape."""
    if isinstance(step, IA3BiasStep):
        return store.site_tensor(adapter, step.key, "l").detach().reshape(weight.shape)
    vector = store.site_tensor(adapter, step.key, "l").detach()
    return vector.T if step.fan_in_fan_out else vector


def _with_fan_in_fan_out(config: IA3Config, sites: list[IA3Site]) -> IA3Config:
    """PEFT sets fan_in_fan_out from the targeted layer type (True for Conv1D, False for nn.Linear) with a
    warning, and saves it so; the graph reads each site's own layout either way."""
    layouts = {s.fan_in_fan_out for s in sites}
    if len(layouts) != 1 or config.fan_in_fan_out in layouts:
        return config
    actual = layouts.pop()
    kind = "Conv1D" if actual else "`torch.nn.Linear`"
    warnings.warn(
        f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module is {kind}. Setting "
        f"fan_in_fan_out to {actual}.",
        UserWarning,
        stacklevel=7,
    )
    config = copy.copy(config)
    config.fan_in_fan_out = actual
    return config


METHOD = IA3()
