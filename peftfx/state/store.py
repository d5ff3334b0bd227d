"""The adapter store: the one owner of every adapter tensor, shared by all variant graphs.

The store is an nn.Module tree that mirrors the model's module paths, so an adapter tensor of the site
`model.layers.0.self_attn.q_proj` lives at `model.layers.0.self_attn.q_proj.lora_A.<adapter>.weight`
(PEFT's naming; each method picks its container names). Each variant graph mounts the store as its
`peftfx` submodule and reads the tensors with get_attr, so all graphs see the same tensors and an
optimizer step is visible everywhere.

The store knows nothing about a method's math: it holds each adapter's method object, config, sites
(method-specific facts per site key), the tensors created for them, saved module copies and trained
biases, and asks the method for layouts and slot-bank tensors.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional, cast, overload

import torch
from torch import nn

from ..config import AdapterConfig
from ..rewrite.layout import MOUNT  # noqa: F401 - where variant graphs mount the store

if TYPE_CHECKING:
    from ..virtual_tokens import PromptModule


@overload
def module_at(root: nn.Module, path: str, create: Literal[True]) -> nn.Module: ...
@overload
def module_at(root: nn.Module, path: str, create: bool = False) -> Optional[nn.Module]: ...


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
    """Adapter tensors by site and adapter name, plus the Python-side facts about them."""

    def __init__(self) -> None:
        super().__init__()
        self.configs: dict[str, AdapterConfig] = {}
        self.methods: dict[str, Any] = {}  # adapter -> its AdapterMethod (peftfx/methods/)
        self.sites: dict[str, dict[str, Any]] = {}  # adapter -> site key -> the method's facts about the site
        self.saved: dict[str, dict[str, nn.Module]] = {}  # adapter -> module path -> trainable copy
        self.bias_names: dict[str, list[str]] = {}  # adapter -> base bias parameters it trains and saves
        self.owned: dict[
            str, dict[str, nn.Module]
        ] = {}  # adapter -> store path -> whole module it owns (a prompt encoder)
        self.version = 0  # bumped on every structural change
        # adapter -> the version at which it was (last) added to: variant graphs that name an adapter key
        # on it, so adding or deleting *another* adapter leaves them valid
        self.generation: dict[str, int] = {}
        self._paths: dict[str, dict[tuple[str, str], str]] = {}  # adapter -> (site key, name) -> store path
        self._layouts: dict[tuple, tuple] = {}
        self._sites: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # adapter -> key -> name -> tensor
        self._bindings: dict[str, list[tuple[str, dict[str, nn.Parameter], dict[str, torch.Tensor]]]] = {}
        self._params: dict[str, list[nn.Parameter]] = {}  # adapter -> its parameters, for this version
        self._tables_version = -1

    def _apply(self, fn, recurse=True):
        # .to() replaces buffers (LoRA's scaling tensors): forget the cached tensor tables
        self._tables_version = -1
        return super()._apply(fn, recurse)

    # -- tree helpers ------------------------------------------------------------------------------

    @overload
    def node(self, path: str, create: Literal[True]) -> nn.Module: ...
    @overload
    def node(self, path: str, create: bool = False) -> Optional[nn.Module]: ...

    def node(self, path: str, create: bool = False) -> Optional[nn.Module]:
        return module_at(self, path, create)

    def tensor(self, path: str) -> torch.Tensor:
        """The tensor at a store path."""
        module_path, _, name = path.rpartition(".")
        return getattr(self.node(module_path) if module_path else self, name)

    @staticmethod
    def saved_module_path(path: str, adapter: str) -> str:
        return f"{path}.modules_to_save.{adapter}"

    # -- creating an adapter's tensors ---------------------------------------------------------------

    def add_site(self, adapter: str, key: str, site: Any) -> None:
        """Record a site before its tensors: `delete` then also clears a half-made site."""
        self.sites.setdefault(adapter, {})[key] = site

    def add_site_module(
        self, adapter: str, key: str, container: str, module: nn.Module, tensors: dict[str, str]
    ) -> None:
        """`<key>.<container>.<adapter>` := module (PEFT's ModuleDict layout); `tensors` names its
        tensors for the method (e.g. {"A": "weight"})."""
        holder = self.node(key, create=True)
        if container not in holder._modules:
            holder.add_module(container, nn.ModuleDict())
        cast(nn.ModuleDict, holder._modules[container])[adapter] = module
        for name, attr in tensors.items():
            self._paths.setdefault(adapter, {})[(key, name)] = f"{key}.{container}.{adapter}.{attr}"
        self._changed(adapter)

    def add_site_parameter(self, adapter: str, key: str, container: str, name: str, param: nn.Parameter) -> None:
        """`<key>.<container>.<adapter>` := param (PEFT's ParameterDict layout, as IA3's `ia3_l`)."""
        holder = self.node(key, create=True)
        if container not in holder._modules:
            holder.add_module(container, nn.ParameterDict())
        cast(nn.ParameterDict, holder._modules[container])[adapter] = param
        self._paths.setdefault(adapter, {})[(key, name)] = f"{key}.{container}.{adapter}"
        self._changed(adapter)

    def add_site_buffer(self, adapter: str, key: str, name: str, value: torch.Tensor) -> None:
        """A non-persistent tensor beside a site (LoRA's scaling): a graph input, never saved."""
        holder = self.node(key, create=True)
        attr = f"{name}_{adapter}"
        holder.register_buffer(attr, value, persistent=False)
        self._paths.setdefault(adapter, {})[(key, name)] = f"{key}.{attr}"
        self._changed(adapter)

    def site_tensor_path(self, adapter: str, key: str, name: str) -> str:
        """The store path of a site tensor by the method's name for it ("A", "B", "scaling", "l", ...)."""
        return self._paths[adapter][(key, name)]

    def site_tensor(self, adapter: str, key: str, name: str) -> torch.Tensor:
        return self.site_tensors(adapter)[key][name]

    def add_saved_module(self, adapter: str, path: str, original: nn.Module) -> nn.Module:
        holder = self.node(path, create=True)
        if "modules_to_save" not in holder._modules:
            holder.add_module("modules_to_save", nn.ModuleDict())
        clone = copy.deepcopy(original)
        for p in clone.parameters():
            p.requires_grad_(True)
        cast(nn.ModuleDict, holder._modules["modules_to_save"])[adapter] = clone
        self.saved.setdefault(adapter, {})[path] = clone
        self._changed(adapter)
        return clone

    def add_owned_module(self, adapter: str, root: str, module: nn.Module) -> str:
        """`<root>.<adapter>` := a module the adapter owns whole (a prompt encoder); returns its path."""
        if root not in self._modules:
            self.add_module(root, nn.ModuleDict())
        cast(nn.ModuleDict, self._modules[root])[adapter] = module
        path = f"{root}.{adapter}"
        self.owned.setdefault(adapter, {})[path] = module
        self._changed(adapter)
        return path

    @property
    def prompts(self) -> dict[str, PromptModule]:
        """adapter -> its prompt encoder (prompt/prefix tuning's owned module)."""
        return {a: cast("PromptModule", m) for a, owned in self.owned.items() for m in owned.values()}

    def prompt_module_path(self, adapter: str) -> str:
        return next(iter(self.owned[adapter]))

    def prompt_weight_path(self, adapter: str) -> str:
        return f"{self.prompt_module_path(adapter)}.embedding.weight"

    # -- what graphs read ------------------------------------------------------------------------------

    def method_of(self, adapter: str) -> Any:
        return self.methods[adapter]

    @property
    def kinds(self) -> dict[str, str]:
        """adapter -> peft_type."""
        return {a: m.peft_type for a, m in self.methods.items()}

    def adapters_of(self, method_name: str) -> list[str]:
        return [a for a, m in self.methods.items() if m.name == method_name]

    def layout(self, adapter: str) -> tuple:
        """What a graph depends on about an adapter (the method says), cached per store version."""
        cache_key = (adapter, self.version)
        if cache_key not in self._layouts:
            if len(self._layouts) > 256:
                self._layouts.clear()
            method = self.methods[adapter]
            self._layouts[cache_key] = (method.name, method.layout(self, adapter))
        return self._layouts[cache_key]

    def _check_tables(self) -> None:
        if self._tables_version != self.version:
            self._sites.clear()
            self._bindings.clear()
            self._params.clear()
            self._tables_version = self.version

    def site_tensors(self, adapter: str) -> dict[str, dict[str, torch.Tensor]]:
        """key -> name -> tensor of an adapter. Looked up in the module tree once per store version:
        set_adapter and slot binding run on every switch and must not walk the tree each time."""
        self._check_tables()
        if adapter not in self._sites:
            table: dict[str, dict[str, torch.Tensor]] = {}
            for (key, name), path in self._paths.get(adapter, {}).items():
                table.setdefault(key, {})[name] = self.tensor(path)
            self._sites[adapter] = table
        return self._sites[adapter]

    def site_bindings(self, adapter: str) -> list[tuple[str, dict[str, nn.Parameter], dict[str, torch.Tensor]]]:
        """(key, parameters by name, buffers by name) per site: what a slot bank points its holders at,
        split once per store version (a switch then updates two dicts per site, no type checks)."""
        self._check_tables()
        if adapter not in self._bindings:
            self._bindings[adapter] = [
                (
                    key,
                    {n: t for n, t in tensors.items() if isinstance(t, nn.Parameter)},
                    {n: t for n, t in tensors.items() if not isinstance(t, nn.Parameter)},
                )
                for key, tensors in self.site_tensors(adapter).items()
            ]
        return self._bindings[adapter]

    # -- adapters as a whole ---------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return list(self.configs)

    def adapter_parameters(self, adapter: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(store path, parameter) of everything this adapter owns."""
        for path in self._paths.get(adapter, {}).values():
            value = self.tensor(path)
            if isinstance(value, nn.Parameter):
                yield path, value
        for path, clone in self.saved.get(adapter, {}).items():
            prefix = self.saved_module_path(path, adapter)
            for name, p in clone.named_parameters():
                yield f"{prefix}.{name}", p
        for prefix, module in self.owned.get(adapter, {}).items():
            for name, p in module.named_parameters():
                yield f"{prefix}.{name}", p

    def delete(self, adapter: str) -> None:
        """Drop every tensor and fact of an adapter (tolerant of one whose creation was interrupted)."""
        for path in self._paths.pop(adapter, {}).values():
            module_path, _, attr = path.rpartition(".")
            holder = self.node(module_path)
            if holder is not None and attr in holder._buffers:
                del holder._buffers[attr]
        for key in self.sites.pop(adapter, {}):
            holder = self.node(key)
            for container in list(holder._modules.values()) if holder is not None else []:
                if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and adapter in container:
                    del container[adapter]
        for path in self.saved.pop(adapter, {}):
            holder = cast(nn.Module, self.node(path))  # add_saved_module made it
            del cast(nn.ModuleDict, holder.modules_to_save)[adapter]
        for path in self.owned.pop(adapter, {}):
            root, _, name = path.rpartition(".")
            del cast(nn.ModuleDict, self._modules[root])[name]
        self.configs.pop(adapter, None)
        self.methods.pop(adapter, None)
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
