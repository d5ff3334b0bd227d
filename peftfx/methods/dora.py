"""DoRA: LoRA with a learned per-row magnitude (PEFT's `LoraConfig(use_dora=True)`, DoraLinearLayer).

Per targeted linear, with W the base weight in (out, in) layout, s the LoRA scaling and m [out] the
magnitude (initialised to the row norms of W + s B A):

    n = ||W + s B A||  per output row, detached (the norm gets no gradient, DoRA paper section 4.3)
    g = m / n
    y' = y + (g - 1) * (x W^T) + g * s * B(A(x))        (eval, or lora_dropout = 0: x W^T = y - bias)
    y' = y + (g - 1) * (x' W^T) + g * s * B(A(x'))      (train with dropout: x' = dropout(x), PEFT's path)

Sites, A, B and scaling are LoRA's (peftfx/methods/lora.py: plan_slots, add_lora_tensors, delta_weight);
DoRA adds the magnitude `<site>.lora_magnitude_vector.<adapter>.weight` (saved under PEFT's key
`<site>.lora_magnitude_vector`) and non-persistent site buffers the graphs read through the slot bank:

- `dora_scale` g, `dora_B` = (g s) B and, on sites with a bias, `dora_bias` = (1 - g) bias: the eval
  graph is `addcmul(linear(linear(x, A), dora_B, dora_bias), y, g)`, a matmul pair and one elementwise op
  like LoRA's. `before_run` recomputes them only when A, B, m, scaling, W or the bias changed since
  (tensor `_version` counters, identities and data pointers), so an eval forward does not compute the
  norm. (In-place writes through `.data` bypass version counters and are not seen.)
- `dora_wnorm2` = ||W||² per row, refreshed the same way before a train forward (W is frozen): the train
  graph recomputes n in the graph, as PEFT does, without materialising W + s B A (passes/dora.py).

Merge is PEFT's: W' = (m / ||W + ΔW||) (W + ΔW), the norm kept in the merge cache for unmerge.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, cast

import torch
from torch import nn

from peftfx.passes import dora as dora_pass

from ..config import LoraConfig
from ..config.lora import accept_lora_option
from ..errors import ConfigError
from .base import PEFT_PREFIX, AdapterMethod, AdapterPlan, Entry, MethodEnv, modules_to_save_paths
from .lora import METHOD as LORA
from .lora import (
    LoraSlot,
    adapter_dtype,
    add_lora_tensors,
    delta_weight,
    plan_slots,
    trainable_biases,
)

if TYPE_CHECKING:
    from ..state.store import AdapterStore

accept_lora_option("use_dora", True)

MAGNITUDE = "lora_magnitude_vector"  # PEFT's container name (and its checkpoint key's last part)
# the method's names for its tensors (slot-bank attributes; the buffers live at `<site>.<name>_<adapter>`)
M, SCALE, B_EVAL, BIAS_EVAL, W_NORM2 = (
    dora_pass.M,
    dora_pass.SCALE,
    dora_pass.B_EVAL,
    dora_pass.BIAS_EVAL,
    dora_pass.W_NORM2,
)


@dataclass(frozen=True)
class DoraSlot(LoraSlot):
    """A LoRA slot plus what DoRA's refresh needs: the base weight and bias tensors (the model's own,
    which the graphs read too) and the version signatures its buffers were last computed at."""

    base: dict = field(default_factory=dict, compare=False, hash=False, repr=False)


def magnitude_path(key: str, adapter: str) -> str:
    return f"{key}.{MAGNITUDE}.{adapter}.weight"


def _oriented(weight: torch.Tensor, slot: LoraSlot) -> torch.Tensor:
    """The base weight as (out, in)."""
    return weight.T if slot.fan_in_fan_out else weight


def _base_weight(slot: DoraSlot) -> torch.Tensor:
    weight = slot.base["weight"]
    if weight.dim() != 2 or weight.numel() != slot.in_features * slot.out_features or not weight.is_floating_point():
        raise ConfigError(
            f"DoRA needs the full-precision base weight of {slot.key!r}, which is quantized or "
            "hollow; DoRA on a quantized base is not supported (dequantize first)."
        )
    return weight


def weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot: LoraSlot) -> torch.Tensor:
    """||W + s B A|| per output row, as PEFT's DoraLinearLayer.get_weight_norm computes it."""
    w = _oriented(weight.detach(), slot).to(a.dtype)
    return torch.linalg.norm(w + slot.scaling * (b.detach() @ a.detach()), dim=1).to(a.dtype)


class Dora(AdapterMethod):
    name = "dora"
    peft_type = "LORA"
    config_class = LoraConfig
    passes = (dora_pass.PASS,)
    can_merge = can_stack = can_mix = banked = True
    can_combine = False  # add_weighted_adapter would need a magnitude for the combination

    def claims(self, config: Any) -> bool:
        return isinstance(config, LoraConfig) and bool(config.use_dora)

    # -- adding ---------------------------------------------------------------------------------------

    def plan(self, env: MethodEnv, name: str, config: Any) -> AdapterPlan:
        slots = [
            DoraSlot(**{f.name: getattr(s, f.name) for f in dataclasses.fields(LoraSlot)})
            for s in plan_slots(env, config)
        ]
        params = dict(env.model.named_parameters())
        for slot in slots:
            weight = params[slot.weight_path]
            if weight.numel() != slot.in_features * slot.out_features or not weight.is_floating_point():
                raise ConfigError(
                    f"DoRA needs the full-precision weight of {slot.key!r}; DoRA on a quantized base is not supported."
                )
        saved = modules_to_save_paths(env.model, config)
        return AdapterPlan(name, config, self, slots, saved, trainable_biases(env.model, config, slots, saved))

    def entries(self, env: MethodEnv, plan: AdapterPlan) -> list[Entry]:
        """LoRA's A and B, plus the magnitude vector of each site."""
        out = LORA.entries(env, plan)
        for slot in plan.sites:
            out.append(
                Entry(
                    f"{PEFT_PREFIX}{slot.key}.{MAGNITUDE}",
                    "store",
                    magnitude_path(slot.key, plan.name),
                    (slot.out_features,),
                )
            )
        return out

    def create(self, env: MethodEnv, plan: AdapterPlan) -> None:
        params = dict(env.model.named_parameters())
        store = env.store
        for slot in plan.sites:
            weight = params[slot.weight_path]
            dtype = adapter_dtype(weight)
            add_lora_tensors(
                store, plan.name, slot, cast(LoraConfig, plan.config).init_lora_weights, dtype, weight.device
            )
            slot.base.update(weight=weight, bias=params.get(slot.bias_path) if slot.bias_path else None)
            a, b = store.site_tensor(plan.name, slot.key, "A"), store.site_tensor(plan.name, slot.key, "B")
            holder = nn.Module()
            with torch.no_grad():
                holder.weight = nn.Parameter(weight_norm(weight, a, b, slot))  # PEFT: ||W + s B A|| at init
            store.add_site_module(plan.name, slot.key, MAGNITUDE, holder, {M: "weight"})
            shapes = {SCALE: (slot.out_features,), B_EVAL: (slot.out_features, slot.r), W_NORM2: (slot.out_features,)}
            if slot.bias_path:
                shapes[BIAS_EVAL] = (slot.out_features,)
            for role, shape in shapes.items():
                store.add_site_buffer(plan.name, slot.key, role, torch.zeros(shape, dtype=dtype, device=weight.device))
        self.before_run(store, (plan.name,), training=False)
        self.before_run(store, (plan.name,), training=True)

    # -- variants -------------------------------------------------------------------------------------

    def layout(self, store: "AdapterStore", adapter: str) -> tuple:
        return tuple(
            (s.key, s.r, s.dropout, str(store.site_tensor(adapter, s.key, "A").dtype))
            for s in store.sites.get(adapter, {}).values()
        )

    def before_run(self, store: "AdapterStore", adapters: tuple[str, ...], training: bool) -> None:
        """Recompute the buffers the variant about to run reads as constants, for the sites whose inputs
        changed since they were last computed (eval: g, B_eval, bias_eval; train: ||W||²)."""
        which = "train" if training else "eval"
        for adapter in adapters:
            tables = store.site_tensors(adapter)
            for key, slot in store.sites.get(adapter, {}).items():
                t = tables[key]
                weight, bias = slot.base["weight"], slot.base["bias"]
                sig: tuple[Any, ...]
                if training:
                    sig = (weight._version, weight.data_ptr(), id(t[W_NORM2]))
                else:
                    a, b, m, s = t["A"], t["B"], t[M], t["scaling"]
                    sig = (
                        a._version,
                        id(a),
                        b._version,
                        id(b),
                        m._version,
                        id(m),
                        s._version,
                        id(s),
                        weight._version,
                        weight.data_ptr(),
                        id(t[SCALE]),
                        None if bias is None else (bias._version, bias.data_ptr()),
                    )
                if slot.base.get(which) != sig:
                    with torch.no_grad():
                        (_refresh_train if training else _refresh_eval)(slot, t)
                    slot.base[which] = sig

    # -- merging --------------------------------------------------------------------------------------

    def merge_sites(self, store: "AdapterStore", adapter: str) -> Iterable[Any]:
        return store.sites.get(adapter, {}).values()

    def merge_weight(
        self, store: "AdapterStore", adapter: str, site: Any, weight: torch.Tensor, cache: dict[str, Any]
    ) -> torch.Tensor:
        """PEFT's DoRA merge: (m / ||W + ΔW||) (W + ΔW), the norm kept for unmerge. The norm is taken of the
        weight as it is now (PEFT 0.21 first takes other adapters merged into the same weight out again)."""
        delta = delta_weight(store, adapter, site)
        merged = weight.to(delta.dtype) + delta
        norm = torch.linalg.norm(_oriented(merged, site), dim=1)
        cache["weight_norm"] = norm
        return (self._factor(store, adapter, site, norm) * merged).to(weight.dtype)

    def unmerge_weight(
        self, store: "AdapterStore", adapter: str, site: Any, weight: torch.Tensor, cache: dict[str, Any]
    ) -> torch.Tensor:
        if "weight_norm" not in cache:
            raise ConfigError(
                f"cannot unmerge DoRA adapter {adapter!r} from {site.key!r}: the weight norm its merge kept is gone."
            )
        delta = delta_weight(store, adapter, site)
        factor = self._factor(store, adapter, site, cache.pop("weight_norm"))
        return (weight.to(delta.dtype) / factor - delta).to(weight.dtype)

    @staticmethod
    def _factor(store: "AdapterStore", adapter: str, site: Any, norm: torch.Tensor) -> torch.Tensor:
        """m / norm shaped to scale the output rows of the weight in its own layout."""
        factor = store.site_tensor(adapter, site.key, M).detach() / norm
        return factor.view(1, -1) if site.fan_in_fan_out else factor.view(-1, 1)


def _refresh_eval(slot: DoraSlot, t: dict[str, torch.Tensor]) -> None:
    """g = m / ||W + s B A||, B_eval = (g s) B, bias_eval = (1 - g) bias (PEFT's eval math, folded)."""
    weight, bias = _base_weight(slot), slot.base["bias"]
    a, b, m, s = t["A"], t["B"], t[M], t["scaling"]
    g = m.detach() / weight_norm(weight, a, b, slot)
    t[SCALE].copy_(g)
    t[B_EVAL].copy_(b.detach() * (g * s).unsqueeze(1))
    if BIAS_EVAL in t and bias is not None:
        t[BIAS_EVAL].copy_((1 - g) * bias.detach().to(g.dtype))


def _refresh_train(slot: DoraSlot, t: dict[str, torch.Tensor]) -> None:
    """||W||² per output row, the constant part of the train graph's norm."""
    w = _oriented(_base_weight(slot).detach(), slot).to(t[W_NORM2].dtype)
    t[W_NORM2].copy_((w * w).sum(dim=1))


METHOD = Dora()
