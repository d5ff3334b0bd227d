"""Checkpoints in PEFT's format: adapter_config.json + adapter_model.safetensors, PEFT's key names.

Each method names its own tensors' keys (`AdapterMethod.entries`: LoRA's `base_model.model.<site>.lora_A.weight`,
adapter name stripped; prompt learning's `prompt_embeddings`); this module adds modules_to_save tensors
(`base_model.model.<module>.<tensor>`) and trained biases (`<site>.base_layer.bias` when the site carries
an adapter, PEFT's wrapper name, and `<path>.bias` otherwise), checks a checkpoint against them and
writes them. It works on the store and plans, never on a PeftFxModel. The default adapter is written to the folder,
others to `<folder>/<name>/`, as PEFT does.

Saves are all-or-nothing through peftfx/save_store.py: a reader sees the old save or the new one,
never a mix of the two, for every adapter of a multi-adapter save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import warnings
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import load_file, save_file

from . import hub, save_store
from .config import DEFAULT_LORA_TARGETS, AdapterConfig, LoraConfig, config_from_dict
from .errors import AdapterNotFoundError, CheckpointError, ConfigError
from .methods.base import PEFT_PREFIX, AdapterPlan, Entry, MethodEnv, modules_to_save_paths
from .sharding import is_sharded
from .state.store import AdapterStore

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def existing_plan(store: AdapterStore, name: str) -> AdapterPlan:
    """The plan of an adapter already in the store (what save_pretrained writes)."""
    return AdapterPlan(
        name,
        store.configs[name],
        store.method_of(name),
        list(store.sites.get(name, {}).values()),
        list(store.saved.get(name, {})),
        list(store.bias_names.get(name, [])),
    )


def plan_entries(env: MethodEnv, plan: AdapterPlan) -> list[Entry]:
    """The tensors an adapter's checkpoint holds: the method's own, its saved modules' and its trained
    biases', derived from the plan (so it works before the adapter is added)."""
    store, model = env.store, env.model
    entries = list(plan.method.entries(env, plan))
    saved_prefix = plan.method.saved_key_prefix
    for path in plan.saved_paths:
        prefix = store.saved_module_path(path, plan.name)
        for name, tensor in model.get_submodule(path).state_dict(keep_vars=True).items():
            entries.append(Entry(f"{saved_prefix}{path}.{name}", "store", f"{prefix}.{name}", tuple(tensor.shape)))
    # PEFT writes the bias of a site it wrapped (one any adapter adapts) as `<site>.base_layer.bias`
    wrapped = {s.bias_path: s.key for s in plan.sites if getattr(s, "bias_path", None)}
    for sites in store.sites.values():
        wrapped.update({s.bias_path: s.key for s in sites.values() if getattr(s, "bias_path", None)})
    params = dict(model.named_parameters())
    for name in plan.bias_names:
        key = f"{wrapped[name]}.base_layer.bias" if name in wrapped else name
        entries.append(Entry(f"{PEFT_PREFIX}{key}", "base", name, tuple(params[name].shape)))
    return entries


def entry_tensor(env: MethodEnv, entry: Entry) -> torch.Tensor:
    if entry.owner == "store":
        return env.store.tensor(entry.path)
    module_path, _, name = entry.path.rpartition(".")
    return getattr(env.model.get_submodule(module_path) if module_path else env.model, name)


# PEFT wrapper names that may appear inside checkpoint keys and name the same tensor as without them.
WRAPPER_SEGMENTS = (".base_layer.", ".modules_to_save.")
# With bias="all" PEFT also writes the frozen original of a modules_to_save module; it holds nothing new.
IGNORED_SEGMENT = ".original_module."


def _canonical(key: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, ".")
    return key


def check_weights(entries: list[Entry], weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Match checkpoint keys to entries; any missing, unexpected or misshapen key is an error."""
    by_key = {_canonical(e.peft_key): e for e in entries}
    matched: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in weights.items():
        if IGNORED_SEGMENT in key:
            continue
        entry = by_key.get(_canonical(key))
        if entry is None:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != entry.shape:
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} but the model needs {entry.shape}; "
                "was this adapter trained for a different model size or rank (check r/rank_pattern)?"
            )
        matched[entry.peft_key] = tensor
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} tensor(s) match nothing in the model, e.g. {unexpected[:3]}; "
            "the adapter was made for another architecture or uses a feature peftfx lacks."
        )
    missing = [e.peft_key for e in entries if e.peft_key not in matched]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} adapter tensor(s) are missing, e.g. {missing[:3]}; "
            "the checkpoint is incomplete or its target_modules do not match this model."
        )
    return matched


def copy_weights(env: MethodEnv, entries: list[Entry], matched: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for entry in entries:
            dest = entry_tensor(env, entry)
            dest.copy_(matched[entry.peft_key].to(device=dest.device, dtype=dest.dtype))


# -- writing -----------------------------------------------------------------------------------------

ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME)


def save_adapters(
    env: MethodEnv, directory: str, selected: Optional[Iterable[str]], safe_serialization: bool = True
) -> None:
    """Write the selected adapters all-or-nothing (peftfx/save_store.py): the default adapter into the
    folder, others into `<folder>/<name>/`, as PEFT does."""
    if not safe_serialization:
        warnings.warn("peftfx writes safetensors only; ignoring safe_serialization=False.", stacklevel=3)
    directory = os.fspath(directory)
    store = env.store
    names = list(selected) if selected is not None else store.adapter_names()
    if not names:
        raise CheckpointError(
            f"save_pretrained({directory!r}): there is no adapter to save (the model has none left, or "
            "selected_adapters is empty); add or load one first, or name existing ones in selected_adapters. "
            "Nothing was written."
        )
    unknown = [n for n in names if n not in store.configs]
    if unknown:
        raise CheckpointError(f"cannot save unknown adapter(s) {unknown}; known: {store.adapter_names()}.")
    if save_store.STORE in [n.split("/")[0] for n in names]:
        raise CheckpointError(f"an adapter named {save_store.STORE!r} would clash with peftfx's save store; rename it.")
    parts: dict[str, save_store.Writer] = {
        ("" if name == "default" else name): functools.partial(_write_adapter, env, name) for name in names
    }
    save_store.save(directory, parts, ADAPTER_FILES)


def _write_adapter(env: MethodEnv, name: str, folder: str) -> None:
    """One adapter's two files, each whole, with the usual permissions, flushed to disk."""
    tensors = adapter_tensors(env, name)
    save_store.atomic_write(
        os.path.join(folder, SAFETENSORS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    config = json.dumps(saved_config_dict(env, name), indent=2, sort_keys=True)
    save_store.atomic_write(os.path.join(folder, CONFIG_NAME), config)


def adapter_tensors(env: MethodEnv, name: str) -> dict[str, torch.Tensor]:
    """An adapter's checkpoint tensors by PEFT key, as save_pretrained writes them."""
    with torch.no_grad():
        return {
            e.peft_key: _whole(e.read() if e.read is not None else entry_tensor(env, e)).detach().contiguous().cpu()
            for e in plan_entries(env, existing_plan(env.store, name))
        }


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (FSDP2) gathered whole: a collective, so every rank reads the adapters in the
    same order (PeftFxModel.save_pretrained does, whatever is_main_process says)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def store_is_sharded(env: MethodEnv) -> bool:
    """Whether any adapter tensor is a DTensor (the model was sharded with FSDP2's fully_shard)."""
    return any(is_sharded(p) for p in env.store.parameters())


def gather_adapters(env: MethodEnv, selected: Optional[Iterable[str]]) -> None:
    """Take part in the gathers a main process's save_adapters makes, in its order, writing nothing."""
    for name in list(selected) if selected is not None else env.store.adapter_names():
        if name in env.store.configs:
            adapter_tensors(env, name)


def saved_config_dict(env: MethodEnv, name: str) -> dict[str, Any]:
    """The adapter_config.json content of an adapter: its config with inference_mode on, PEFT's default
    targets written out, the base model's name and, when the config has none, the task type of the
    model class (so PEFT's AutoPeftModel can choose the class)."""
    model, config = env.model, env.store.configs[name]
    data = config.to_dict()
    data["inference_mode"] = True
    model_config = getattr(model, "config", None)
    if data.get("target_modules", "") is None and isinstance(config, LoraConfig):
        data["target_modules"] = DEFAULT_LORA_TARGETS.get(getattr(model_config, "model_type", None) or "")
    if data["base_model_name_or_path"] is None:
        data["base_model_name_or_path"] = getattr(model_config, "_name_or_path", None) or None
    if data.get("task_type") is None:
        task = task_type_of(model)
        # PEFT (and peftfx) add the task head of a classification task to modules_to_save: fill the task
        # only where that adds nothing, or the reloaded adapter would expect a head it never saved.
        if task is not None and _saved_paths_with_task(model, config, task) == list(env.store.saved.get(name, {})):
            data["task_type"] = task
    return data


def _saved_paths_with_task(model: torch.nn.Module, config: AdapterConfig, task: str) -> list[str]:
    return modules_to_save_paths(model, dataclasses.replace(config, task_type=task))


# transformers' Auto mappings (model_type -> class names) by PEFT task type, most specific first.
_TASK_MAPPINGS = (
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"),
)
_TASK_SUFFIXES = (
    ("CAUSAL_LM", ("ForCausalLM", "LMHeadModel")),
    ("SEQ_CLS", ("ForSequenceClassification",)),
    ("TOKEN_CLS", ("ForTokenClassification",)),
    ("QUESTION_ANS", ("ForQuestionAnswering",)),
)


def task_type_of(model: torch.nn.Module) -> Optional[str]:
    """PEFT's task type for a transformers model class (LlamaForCausalLM -> CAUSAL_LM, ...), from
    transformers' own Auto mappings, else from the class-name suffix; None for anything else."""
    if not hasattr(getattr(model, "config", None), "model_type"):
        return None
    name = type(model).__name__
    from transformers.models.auto import modeling_auto

    for task, mapping in _TASK_MAPPINGS:
        for value in getattr(modeling_auto, mapping, {}).values():
            if name == value or (isinstance(value, (tuple, list)) and name in value):
                return task
    for task, suffixes in _TASK_SUFFIXES:
        if name.endswith(suffixes):
            return task
    return None


# -- PEFT's saved embedding layers -------------------------------------------------------------------


EMBEDDING_GETTERS = ("get_input_embeddings", "get_output_embeddings")


def embedding_modules(model: torch.nn.Module) -> tuple[tuple[Any, Any], ...]:
    """(module, weight) of a transformers model's input and output embeddings, (None, None) where it has
    none. Cheap: ModelState compares them by identity on every call to notice a resize."""
    found = []
    for getter in EMBEDDING_GETTERS:
        get = getattr(model, getter, None)
        try:
            module = get() if callable(get) else None
        except (AttributeError, NotImplementedError):
            module = None
        found.append((module, getattr(module, "weight", None)))
    return tuple(found)


def module_paths(model: torch.nn.Module, modules: Iterable[Any]) -> list[str]:
    """Every path of these modules in `model` (a tied lm_head is its own module sharing the weight)."""
    wanted = {id(m) for m in modules if m is not None}
    paths = [name for name, m in model.named_modules(remove_duplicate=False) if id(m) in wanted]
    return list(dict.fromkeys(p for p in paths if p))


def embedding_paths(model: torch.nn.Module) -> list[str]:
    """Module paths of a transformers model's input and output embeddings."""
    return module_paths(model, (module for module, _ in embedding_modules(model)))


def split_embedding_copies(
    env: MethodEnv, weights: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors, {base parameter name: tensor}). PEFT saves the whole input/output embedding
    weight as `<emb>.base_layer.weight` when the adapter targets it (`lm_head`, tied or not); that is a
    base weight, which PEFT loads into the model. (The `<emb>.weight` PEFT writes for a resized
    vocabulary is not taken: it is also the key of a modules_to_save copy of that module.)"""
    params = dict(env.model.named_parameters(remove_duplicate=False))
    copies: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    names = {f"{PEFT_PREFIX}{path}.base_layer.weight": f"{path}.weight" for path in embedding_paths(env.model)}
    for key, value in weights.items():
        param = names.get(key)
        if param is not None and param in params:
            if tuple(value.shape) != tuple(params[param].shape):
                raise CheckpointError(
                    f"{key!r} (a copy of the base embedding PEFT saves) has shape {tuple(value.shape)} but the "
                    f"model's {param} has {tuple(params[param].shape)}; resize the model's token embeddings "
                    "to the adapter's vocabulary first (model.resize_token_embeddings)."
                )
            copies[param] = value
        else:
            rest[key] = value
    return rest, copies


def copy_embeddings(env: MethodEnv, copies: dict[str, torch.Tensor]) -> None:
    """Write PEFT's saved embedding copies into the base weights, as PEFT's loader does (equal values,
    the usual case, change nothing). A tied weight changes for both its modules."""
    params = dict(env.model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, value in copies.items():
            dest = params[name]
            value = value.to(device=dest.device, dtype=dest.dtype)
            if not torch.equal(dest, value):
                dest.copy_(value)


# -- reading -----------------------------------------------------------------------------------------


def resolve_adapter_files(
    model_id: str, subfolder: Optional[str] = None, revision: Optional[str] = None, **hub_kwargs: Any
) -> tuple[str, str]:
    """(config path, weights path) from a local folder or a hub repo id (through huggingface_hub's
    hf_hub_download, which gets `hub_kwargs`: PEFT's cache_dir, token, local_files_only, ...)."""
    download = hub.download_kwargs(hub_kwargs)  # unknown names are an error for a local folder too
    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        config_path = os.path.join(local, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise AdapterNotFoundError(
                f"{local!r} has no {CONFIG_NAME}; is it an adapter folder written by save_pretrained?"
            )
        pair = save_store.local_pair(local, config_path, (SAFETENSORS_NAME, BIN_NAME))
        if pair is None:
            raise AdapterNotFoundError(f"{local!r} has {CONFIG_NAME} but no {SAFETENSORS_NAME} or {BIN_NAME}.")
        return pair
    if not _REPO_ID.match(model_id) or os.path.exists(model_id):
        raise AdapterNotFoundError(
            f"adapter path {local!r} does not exist; give a folder written by "
            "save_pretrained or a hub repo id like 'user/adapter'."
        )
    return hub.resolve_adapter(model_id, subfolder, revision, download, CONFIG_NAME, (SAFETENSORS_NAME, BIN_NAME))


def read_config(config_path: str) -> AdapterConfig:
    """Parse adapter_config.json; an empty or damaged file is a ConfigError naming it."""
    try:
        with open(config_path, "rb") as f:
            raw = f.read()
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        what = "is empty" if not raw.strip() else f"is not valid JSON ({exc})"
        raise ConfigError(
            f"{config_path}: {what}. The file was damaged or cut short (an interrupted copy or "
            "download?); save the adapter again or restore the file."
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"{config_path}: holds a JSON {type(data).__name__}, not an object of config fields; "
            "is it an adapter_config.json written by save_pretrained?"
        )
    return config_from_dict(data, source=config_path)


def read_weights(weights_path: str) -> dict[str, torch.Tensor]:
    """Load an adapter's tensors; a truncated or damaged file is a CheckpointError naming it."""
    try:
        if weights_path.endswith(".safetensors"):
            weights = load_file(weights_path)
        else:
            weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors and torch.load raise many types for a bad file
        raise CheckpointError(
            f"{weights_path}: cannot read the adapter weights ({type(exc).__name__}: {exc}). "
            "The file is truncated or damaged (an interrupted copy or download?); save the "
            "adapter again or restore the file."
        ) from exc
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise CheckpointError(
            f"{weights_path}: holds {type(weights).__name__}, not a state dict of tensors; is it an adapter checkpoint?"
        )
    return weights


def read_adapter(
    model_id: str, subfolder: Optional[str] = None, revision: Optional[str] = None, **hub_kwargs: Any
) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    """(config, weights, weights path) of one save, read as a matching pair: a folder saved by peftfx is
    read under a shared lock on its store, so a save in progress is waited for and none commits meanwhile.
    `hub_kwargs`: PEFT's download arguments for a hub repo id (see resolve_adapter_files)."""
    config_path, _ = resolve_adapter_files(model_id, subfolder, revision, **hub_kwargs)
    store = save_store.store_of(config_path)
    with save_store.locked(store, shared=True) if store else contextlib.nullcontext():
        config_path, weights_path = resolve_adapter_files(model_id, subfolder, revision, **hub_kwargs)
        return read_config(config_path), read_weights(weights_path), weights_path
