"""PEFT's state-dict functions for a PeftFxModel: `get_peft_model_state_dict` and
`set_peft_model_state_dict`, with PEFT's keys (adapter name stripped, `base_model.model.` prefix) and
its partial-load semantics (a result with missing and unexpected keys instead of an error).

Code written for PEFT (training loops, DeepSpeed/FSDP checkpoint hooks, adapter averaging) calls these;
peftfx's own checkpoint code (peftfx/io.py) names the keys through each method, and these functions
reuse it, so the keys are save_pretrained's.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch.nn.modules.module import _IncompatibleKeys

from . import io
from .config import ALL_LINEAR
from .errors import CheckpointError, ConfigError
from .methods.base import PEFT_PREFIX, Entry

if TYPE_CHECKING:
    from .model import PeftFxModel

# PEFT's EMBEDDING_LAYER_NAMES: targeting one of these makes PEFT save the embedding's base weight.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def get_peft_model_state_dict(
    model: "PeftFxModel",
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    adapter_name: str = "default",
    save_embedding_layers: Union[bool, str] = "auto",
) -> dict[str, torch.Tensor]:
    """An adapter's tensors under PEFT's keys, as `peft.get_peft_model_state_dict` returns them.

    The tensors are the live ones, detached (as a state dict's are). With `state_dict` (e.g. a state dict
    gathered by DeepSpeed or FSDP, keyed as `model.state_dict()`), the tensors are taken from it instead.
    `save_embedding_layers` as PEFT's: "auto" adds the base weight of a targeted `embed_tokens`/`lm_head`
    (`<module>.base_layer.weight`), True adds both embeddings' weights, False none."""
    env = model.state.env
    model.state.check_known([adapter_name])
    entries = io.plan_entries(env, io.existing_plan(env.store, adapter_name))
    by_id = _state_dict_names(model) if state_dict is not None else {}
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        if state_dict is None or entry.read is not None:
            tensor = entry.read() if entry.read is not None else io.entry_tensor(env, entry)
            out[entry.peft_key] = tensor.detach()
            continue
        assert state_dict is not None
        name = by_id.get(id(io.entry_tensor(env, entry)))
        if name is not None and name in state_dict:
            out[entry.peft_key] = state_dict[name]
        elif entry.peft_key in state_dict:
            out[entry.peft_key] = state_dict[entry.peft_key]
    out.update(_embedding_layers(model, adapter_name, save_embedding_layers))
    return out


def _state_dict_names(model: "PeftFxModel") -> dict[int, str]:
    """id(tensor) -> its key in model.state_dict() (whatever names the facade gives them)."""
    return {id(t): k for k, t in model.state_dict(keep_vars=True).items()}


def _embedding_layers(model: "PeftFxModel", adapter_name: str, save: Union[bool, str]) -> dict[str, torch.Tensor]:
    env = model.state.env
    config = io.saved_config_dict(env, adapter_name)
    targets = config.get("target_modules")
    sites = {getattr(site, "key", None) for site in env.store.sites.get(adapter_name, {}).values()}
    paths = io.embedding_paths(env.model)
    auto = save == "auto"
    if auto:  # PEFT's rule: an embedding layer is named in target_modules (or matched by its regex)
        if isinstance(targets, str):
            save = targets != ALL_LINEAR and any(re.fullmatch(targets, p) for p in paths)
        else:
            save = any(n in (targets or []) for n in EMBEDDING_LAYER_NAMES)
    if not save:
        return {}
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        module = env.model.get_submodule(path)
        infix = ".base_layer" if path in sites else ""
        if auto and not infix:  # "auto" saves only the targeted (wrapped) embeddings
            continue
        for name, tensor in module.named_parameters(recurse=False):
            out[f"{PEFT_PREFIX}{path}{infix}.{name}"] = tensor.detach()
    return out


def set_peft_model_state_dict(
    model: "PeftFxModel",
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
) -> Any:
    """Load PEFT-keyed tensors into an existing adapter, as `peft.set_peft_model_state_dict` does: the
    keys given are copied, the rest stay, and the result (torch's `_IncompatibleKeys`) lists the adapter's
    `missing_keys` (in PEFT's in-model naming, adapter name included) and the `unexpected_keys`. Base
    embedding copies PEFT saves (`lm_head.base_layer.weight`) go into the base weights, as in PEFT.
    A misshapen tensor is a CheckpointError (nothing is copied) unless `ignore_mismatched_sizes`.
    Unlike PEFT, `missing_keys` does not list the base model's weights (never in an adapter state dict)."""
    state = model.state
    env = state.env
    with state.lock:
        state.check_known([adapter_name])
        if adapter_name in state.merged:
            raise ConfigError(
                f"set_peft_model_state_dict: adapter {adapter_name!r} is merged into the base weights; "
                "call unmerge_adapter() first, or the merged weights would keep the old values."
            )
        entries = io.plan_entries(env, io.existing_plan(env.store, adapter_name))
        weights, embeddings = io.split_embedding_copies(env, dict(peft_model_state_dict))
        by_key = {io._canonical(e.peft_key): e for e in entries}
        matched: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        mismatched: list[str] = []
        for key, tensor in weights.items():
            if io.IGNORED_SEGMENT in key:
                continue
            entry = by_key.get(io._canonical(key))
            if entry is None:
                unexpected.append(key)
            elif tuple(tensor.shape) != entry.shape:
                mismatched.append(f"{key}: {tuple(tensor.shape)} in the state dict, {entry.shape} in the model")
            else:
                matched[entry.peft_key] = tensor
        if mismatched and not ignore_mismatched_sizes:
            raise CheckpointError(
                f"set_peft_model_state_dict: {len(mismatched)} tensor(s) do not fit adapter {adapter_name!r}, "
                f"e.g. {mismatched[:3]}; nothing was loaded. Was it trained with another rank or model size? "
                "(ignore_mismatched_sizes=True skips them.)"
            )
        if mismatched:
            warnings.warn(f"set_peft_model_state_dict: skipped tensors of another shape: {mismatched}", stacklevel=2)
        chosen = [e for e in entries if e.peft_key in matched]
        io.copy_weights(env, chosen, matched)
        io.copy_embeddings(env, embeddings)
        missing = [_in_model_key(e) for e in entries if e.peft_key not in matched]
        return _IncompatibleKeys(missing, unexpected)


def _in_model_key(entry: Entry) -> str:
    """PEFT's name for the tensor inside its model (`...q_proj.lora_A.default.weight`): the store path,
    which follows PEFT's naming, under PEFT's prefix; a base tensor (a trained bias) keeps its key."""
    if entry.owner == "store":
        return f"{PEFT_PREFIX}{entry.path}"
    return entry.peft_key
