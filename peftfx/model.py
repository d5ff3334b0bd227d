"""PeftFxModel: the user's model, its adapters, and the variant graph that runs for each call."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import fx, nn

from . import select
from .adapters import AdapterStore, LoraSlot
from .capture import Capture, Capturer
from .config import LoraConfig, as_peftfx_config
from .errors import ConfigError, TargetNotFoundError
from .state import VariantCache

DEFAULT_ADAPTER = "default"


@dataclass
class AdapterPlan:
    """Everything add_adapter will create, computed (and validated) before anything is changed."""

    name: str
    config: LoraConfig
    slots: list[LoraSlot]
    saved_paths: list[str]
    bias_names: list[str]


class PeftFxModel(nn.Module):
    """A model with adapters. Calls run the active variant graph and return the model's own output."""

    def __init__(self, model: nn.Module, example_inputs: Optional[dict[str, Any]] = None,
                 dynamic_axes: Optional[dict[str, dict[int, str]]] = None):
        super().__init__()
        self.base_model = model
        self.adapters = AdapterStore()
        self._capturer = Capturer(model, dynamic_axes)
        self._variants = VariantCache()
        self._example_inputs = example_inputs
        self._active: list[str] = []
        self._disabled = False
        self._last_capture: Optional[Capture] = None
        self.training = model.training
        forward_signature = inspect.signature(model.forward)

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._run(*args, **kwargs)

        # Expose the wrapped model's signature: transformers.Trainer reads it to keep dataset columns.
        forward.__signature__ = forward_signature
        forward.__doc__ = self._run.__doc__
        self.forward = forward

    # -- attribute access falls through to the wrapped model, as PEFT's PeftModel does --------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "adapters", "_modules"):
                raise
            return getattr(self._modules["base_model"], name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.adapters.configs

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active[0] if self._active else None

    # -- adapters -----------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: Any,
                    weights: Optional[dict[str, torch.Tensor]] = None, source: str = "weights") -> None:
        """Add an adapter (active only if it is the first). `weights`, a PEFT-format state dict, are
        checked against the plan before anything changes, so a bad checkpoint leaves the model as it was."""
        from .io import check_weights, copy_weights, plan_entries
        config = as_peftfx_config(peft_config)
        if adapter_name in self.adapters.configs:
            raise ConfigError(f"an adapter named {adapter_name!r} exists already; pick another name "
                              "or delete_adapter() it first.")
        if not adapter_name or "." in adapter_name:
            raise ConfigError(f"adapter name {adapter_name!r} must be non-empty and contain no '.'.")
        plan = self._plan(adapter_name, config)
        entries = plan_entries(self, plan)
        matched = check_weights(entries, weights, source) if weights is not None else None
        self._commit(plan)
        if matched is not None:
            copy_weights(self, entries, matched)
        if not self._active:
            self._active = [adapter_name]

    def adapter_plan(self, adapter_name: str) -> AdapterPlan:
        """The plan an existing adapter was built from (what save_pretrained writes)."""
        return AdapterPlan(adapter_name, self.adapters.configs[adapter_name],
                           list(self.adapters.lora.get(adapter_name, {}).values()),
                           list(self.adapters.saved.get(adapter_name, {})),
                           list(self.adapters.bias_names.get(adapter_name, [])))

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.adapters.configs]
        if missing:
            raise ConfigError(f"unknown adapter(s) {missing}; loaded adapters: {self.adapters.adapter_names()}.")
        for name in self.adapters.adapter_names():
            if not self.adapters.configs[name].inference_mode:
                self.adapters.set_trainable(name, name in names)
        self._active = names

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the untouched base graph inside the block."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    def _plan(self, name: str, config: LoraConfig) -> AdapterPlan:
        capture = self._reference_capture()
        gm = capture.fresh_module()
        sites = select.linear_sites(gm, self.base_model)
        targets = select.resolve_targets(sites, config, self.base_model)
        slots = []
        for site in targets:
            r, alpha = select.resolve_rank(site, config)
            slots.append(LoraSlot(site.key, r, alpha, config.scaling_for(r, alpha), float(config.lora_dropout),
                                  site.in_features, site.out_features, site.fan_in_fan_out,
                                  site.weight_path, site.bias_path))
        saved_paths = self._resolve_modules_to_save(config)
        bias_names = self._trainable_bias_names(config, slots)
        return AdapterPlan(name, config, slots, saved_paths, bias_names)

    def _resolve_modules_to_save(self, config: LoraConfig) -> list[str]:
        """Module paths ending in a modules_to_save name (PEFT's rule). PEFT writes the task heads of
        every architecture (classifier and score), so only a list that matches nothing is an error."""
        wanted = config.resolved_modules_to_save()
        module_names = [n for n, _ in self.base_model.named_modules() if n]
        found = [n for n in module_names if any(n == w or n.endswith(f".{w}") for w in wanted)]
        if wanted and not found and config.modules_to_save:
            raise TargetNotFoundError(
                f"modules_to_save={config.modules_to_save!r} matches no module of "
                f"{type(self.base_model).__name__}; top-level modules: {[n for n in module_names if '.' not in n]}.")
        return [n for n in found if not any(n.startswith(p + ".") for p in found)]

    def _trainable_bias_names(self, config: LoraConfig, slots: list[LoraSlot]) -> list[str]:
        if config.bias == "all":
            return [n for n, _ in self.base_model.named_parameters() if "bias" in n]
        if config.bias == "lora_only":
            return [s.bias_path for s in slots if s.bias_path]
        return []

    def _commit(self, plan: AdapterPlan) -> None:
        if not self.adapters.configs:
            for p in self.base_model.parameters():
                p.requires_grad_(False)
        params = dict(self.base_model.named_parameters())
        for slot in plan.slots:
            weight = params[slot.weight_path]
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            self.adapters.add_lora(plan.name, slot, plan.config.init_lora_weights, dtype, weight.device)
        for path in plan.saved_paths:
            self.adapters.add_saved_module(plan.name, path, self.base_model.get_submodule(path))
        trainable = not plan.config.inference_mode
        for bias in plan.bias_names:
            params[bias].requires_grad_(trainable)
        self.adapters.configs[plan.name] = plan.config
        self.adapters.bias_names[plan.name] = plan.bias_names
        self.adapters.set_trainable(plan.name, trainable and (not self._active))

    # -- running --------------------------------------------------------------------------------------

    def _reference_capture(self) -> Capture:
        """The capture used to find targets: the user's example inputs, or ones made from the HF config."""
        if self._last_capture is not None:
            return self._last_capture
        example = self._example_inputs
        if example is None:
            example = hf_example_inputs(self.base_model)
        args, kwargs = ((), dict(example)) if isinstance(example, dict) else (tuple(example), {})
        named = self._capturer.prepare_inputs(args, kwargs)
        self._last_capture = self._capturer.get(named, training=False)
        return self._last_capture

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        """Run the active variant; same arguments and output type as the wrapped model's forward."""
        named = self._capturer.prepare_inputs(args, kwargs)
        capture = self._capturer.get(named, self.training)
        self._last_capture = capture
        return self._graph_for(capture)(**named)

    def _graph_for(self, capture: Capture) -> fx.GraphModule:
        active = () if self._disabled else tuple(self._active)
        return self._variants.get(capture, self.base_model, self.adapters, active, capture.signature.training)

    @property
    def graph_module(self) -> fx.GraphModule:
        """The active variant's GraphModule for the most recent call (or the reference inputs)."""
        return self._graph_for(self._reference_capture())

    def _apply(self, fn, recurse=True):
        # .to()/.half() replace buffers; captured graphs hold the old ones, so capture again lazily.
        result = super()._apply(fn, recurse)
        self._capturer.clear()
        self._variants.clear()
        self._last_capture = None
        return result

    # -- counting and saving ------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        safe_serialization: bool = True, **kwargs: Any) -> None:
        from .io import save_adapters
        save_adapters(self, save_directory, selected_adapters, safe_serialization)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> None:
        from .io import load_adapter_into
        load_adapter_into(self, model_id, adapter_name, is_trainable=is_trainable, **kwargs)


def hf_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Token ids and a mask for a transformers model, from its config (no tokenizer, no download)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise ConfigError(
            f"cannot make example inputs for {type(model).__name__}; pass example_inputs="
            "{'name': tensor, ...} (or a tuple of positional tensors) to peftfx.apply.")
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
