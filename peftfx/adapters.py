"""The adapter store: the one owner of every adapter parameter, shared by all variant graphs.

The store is an nn.Module tree that mirrors the model's module paths, so an adapter weight of the
site `model.layers.0.self_attn.q_proj` lives at `model.layers.0.self_attn.q_proj.lora_A.<adapter>.weight`
(PEFT's naming). Each variant graph mounts the store as its `peftfx` submodule and reads the weights
with get_attr, so all graphs see the same tensors and an optimizer step is visible everywhere.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from .config import LoraConfig

MOUNT = "peftfx"  # attribute name of the store inside each variant GraphModule


@dataclass(frozen=True)
class LoraSlot:
    """What the LoRA pass needs to know about one adapted site of one adapter."""

    key: str
    r: int
    alpha: float
    scaling: float
    dropout: float
    in_features: int
    out_features: int
    fan_in_fan_out: bool
    weight_path: str
    bias_path: Optional[str]


def module_at(root: nn.Module, path: str, create: bool = False) -> Optional[nn.Module]:
    """The submodule at dotted `path` below `root` (None if missing), or with `create` a chain of empty
    holder modules made on the way: adapter stores, slot banks and export holders mirror model paths."""
    module: nn.Module = root
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            if not create:
                return None
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module


class AdapterStore(nn.Module):
    """Adapter parameters by site and adapter name, plus the Python-side facts about them."""

    def __init__(self) -> None:
        super().__init__()
        self.configs: dict[str, LoraConfig] = {}
        self.lora: dict[str, dict[str, LoraSlot]] = {}  # adapter -> key -> slot
        self.saved: dict[str, dict[str, nn.Module]] = {}  # adapter -> module path -> trainable copy
        self.bias_names: dict[str, list[str]] = {}  # adapter -> base bias parameters it trains and saves
        self.prompts: dict[str, nn.Module] = {}  # prompt-learning adapter -> its PromptEmbedding/PrefixEncoder
        self.kinds: dict[str, str] = {}  # adapter -> peft_type ("LORA", "PROMPT_TUNING", "PREFIX_TUNING")
        self.version = 0  # bumped on every structural change
        # adapter -> the version at which it was (last) added to: variant graphs that name an adapter key
        # on it, so adding or deleting *another* adapter leaves them valid
        self.generation: dict[str, int] = {}
        self._layouts: dict[tuple, tuple] = {}
        self._sites: dict[str, dict[str, tuple]] = {}  # adapter -> key -> (A, B, scaling), for this version
        self._params: dict[str, list[nn.Parameter]] = {}  # adapter -> its parameters, for this version
        self._sites_version = -1

    def _apply(self, fn, recurse=True):
        # .to() replaces buffers (the scaling tensors): forget the cached tensor tables
        self._sites_version = -1
        return super()._apply(fn, recurse)

    # -- tree helpers ------------------------------------------------------------------------------

    def node(self, path: str, create: bool = False) -> Optional[nn.Module]:
        return module_at(self, path, create)

    @staticmethod
    def lora_weight_path(key: str, adapter: str, which: str) -> str:
        return f"{key}.lora_{which}.{adapter}.weight"

    @staticmethod
    def saved_module_path(path: str, adapter: str) -> str:
        return f"{path}.modules_to_save.{adapter}"

    # -- LoRA ----------------------------------------------------------------------------------------

    def add_lora(self, adapter: str, slot: LoraSlot, init, dtype: torch.dtype, device: torch.device) -> None:
        holder = self.node(slot.key, create=True)
        self.lora.setdefault(adapter, {})[slot.key] = slot  # first: `delete` then finds a half-made site too
        for which, shape in (("A", (slot.r, slot.in_features)), ("B", (slot.out_features, slot.r))):
            name = f"lora_{which}"
            if name not in holder._modules:
                holder.add_module(name, nn.ModuleDict())
            layer = nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=dtype)
            holder._modules[name][adapter] = layer
        _init_lora(holder.lora_A[adapter].weight, holder.lora_B[adapter].weight, init, slot.r)
        holder.register_buffer(f"lora_scaling_{adapter}", torch.tensor(slot.scaling, dtype=dtype, device=device),
                               persistent=False)
        self._changed(adapter)

    def layout(self, adapter: str) -> tuple:
        """What a graph depends on about an adapter: per site (key, r, dropout, dtype), not the values."""
        cache_key = (adapter, self.version)
        if cache_key not in self._layouts:
            if len(self._layouts) > 256:
                self._layouts.clear()
            self._layouts[cache_key] = tuple(
                (s.key, s.r, s.dropout, str(self.lora_weights(adapter, s.key)[0].dtype))
                for s in self.lora.get(adapter, {}).values())
        return self._layouts[cache_key]

    def _check_tables(self) -> None:
        if self._sites_version != self.version:
            self._sites.clear()
            self._params.clear()
            self._sites_version = self.version

    def site_tensors(self, adapter: str) -> dict[str, tuple[nn.Parameter, nn.Parameter, torch.Tensor]]:
        """key -> (A, B, scaling) of an adapter. Looked up in the module tree once per store version:
        set_adapter and slot binding run on every switch and must not walk the tree each time."""
        self._check_tables()
        if adapter not in self._sites:
            table = {}
            for key in self.lora.get(adapter, {}):
                holder = self.node(key)
                table[key] = (holder.lora_A[adapter].weight, holder.lora_B[adapter].weight,
                              holder._buffers[f"lora_scaling_{adapter}"])
            self._sites[adapter] = table
        return self._sites[adapter]

    def scaling_tensor(self, adapter: str, key: str) -> torch.Tensor:
        """The scaling as a 0-d tensor (a graph input, so adapters differing only in alpha share graphs)."""
        return self.site_tensors(adapter)[key][2]

    def lora_weights(self, adapter: str, key: str) -> tuple[nn.Parameter, nn.Parameter]:
        a, b, _ = self.site_tensors(adapter)[key]
        return a, b

    # -- modules_to_save -------------------------------------------------------------------------------

    def add_saved_module(self, adapter: str, path: str, original: nn.Module) -> nn.Module:
        holder = self.node(path, create=True)
        if "modules_to_save" not in holder._modules:
            holder.add_module("modules_to_save", nn.ModuleDict())
        clone = copy.deepcopy(original)
        for p in clone.parameters():
            p.requires_grad_(True)
        holder._modules["modules_to_save"][adapter] = clone
        self.saved.setdefault(adapter, {})[path] = clone
        self._changed(adapter)
        return clone

    # -- prompt learning (virtual tokens) ----------------------------------------------------------------

    PROMPT_ROOT = "prompt_encoder"

    def add_prompt(self, adapter: str, module: nn.Module) -> None:
        if self.PROMPT_ROOT not in self._modules:
            self.add_module(self.PROMPT_ROOT, nn.ModuleDict())
        self._modules[self.PROMPT_ROOT][adapter] = module
        self.prompts[adapter] = module
        self._changed(adapter)

    def prompt_module_path(self, adapter: str) -> str:
        return f"{self.PROMPT_ROOT}.{adapter}"

    def prompt_weight_path(self, adapter: str) -> str:
        return f"{self.prompt_module_path(adapter)}.embedding.weight"

    # -- adapters as a whole ---------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return list(self.configs)

    def adapter_parameters(self, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(store path, parameter) of everything this adapter owns."""
        for key in self.lora.get(adapter, {}):
            a, b = self.lora_weights(adapter, key)
            yield self.lora_weight_path(key, adapter, "A"), a
            yield self.lora_weight_path(key, adapter, "B"), b
        for path, clone in self.saved.get(adapter, {}).items():
            prefix = self.saved_module_path(path, adapter)
            for name, p in clone.named_parameters():
                yield f"{prefix}.{name}", p
        if adapter in self.prompts:
            for name, p in self.prompts[adapter].named_parameters():
                yield f"{self.prompt_module_path(adapter)}.{name}", p

    def delete(self, adapter: str) -> None:
        """Drop every tensor and fact of an adapter."""
        for key in self.lora.pop(adapter, {}):  # tolerant of a site whose creation was interrupted
            holder = self.node(key)
            for name in ("lora_A", "lora_B"):
                if adapter in holder._modules.get(name, {}):
                    del holder._modules[name][adapter]
            holder._buffers.pop(f"lora_scaling_{adapter}", None)
        for path in self.saved.pop(adapter, {}):
            del self.node(path).modules_to_save[adapter]
        if self.prompts.pop(adapter, None) is not None:
            del self._modules[self.PROMPT_ROOT][adapter]
        self.configs.pop(adapter, None)
        self.kinds.pop(adapter, None)
        self.bias_names.pop(adapter, None)
        self.generation.pop(adapter, None)
        self.version += 1

    def _changed(self, adapter: str) -> None:
        self.version += 1
        self.generation[adapter] = self.version

    def set_trainable(self, adapter: str, trainable: bool) -> None:
        self._check_tables()
        if adapter not in self._params:
            self._params[adapter] = [p for _, p in self.adapter_parameters(adapter)]
        for p in self._params[adapter]:
            if p.requires_grad != trainable:
                p.requires_grad_(trainable)


def _init_lora(a: torch.Tensor, b: torch.Tensor, init, r: int) -> None:
    """PEFT's initialisations: True = kaiming-uniform A and zero B (an identity adapter), 'gaussian' =
    normal(0, 1/r) A and zero B, False = both random (a non-identity adapter, for tests)."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)
