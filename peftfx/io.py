"""Checkpoints in PEFT's format: adapter_config.json + adapter_model.safetensors, PEFT's key names.

Keys are `base_model.model.<site>.lora_A.weight` (adapter name stripped), modules_to_save tensors as
`base_model.model.<module>.<tensor>`, trained biases as `<site>.base_layer.bias` when the site carries
LoRA (PEFT's wrapper name) and `<path>.bias` otherwise. The default adapter is written to the folder,
others to `<folder>/<name>/`, as PEFT does.

Saves are all-or-nothing. A save changes several files (config and weights of each adapter), and no
sequence of file renames does that atomically, while renaming the folder itself would move the user's
own files in it (and leave no folder at all for a moment). So the files live in save folders inside a
hidden `.peftfx/` store, and one symbolic link names the live one:

    <folder>/adapter_config.json        -> .peftfx/current/adapter_config.json
    <folder>/adapter_model.safetensors  -> .peftfx/current/adapter_model.safetensors
    <folder>/<name>/adapter_config.json -> ../.peftfx/current/<name>/adapter_config.json  (and weights)
    <folder>/.peftfx/current            -> save-<id>
    <folder>/.peftfx/save-<id>/         the files of the live save

A save writes and fsyncs a complete new `save-<id>` (adapters of the live save that this save does not
name are hard-linked in, so they stay, as with PEFT); makes every entry path such a link (a plain file
from PEFT or an older peftfx is first hard-linked into the live save, then replaced by the link: one
rename, same bytes; a new entry's link dangles, i.e. is absent, as it is in the live save); and then
commits with a single `rename(2)` of a fresh link over `.peftfx/current`. Each step before the commit
leaves what readers see unchanged; the commit switches every adapter at once. After it the old save,
temporary links and dangling links are removed; leftovers of a killed save are removed by the next save.
An exclusive lock on the store makes concurrent saves to one folder take turns. The user's files are
not touched.

Guarantees and limits:
- after a save that returns, fails or is interrupted anywhere (Ctrl-C, kill, crash, and power loss on a
  filesystem that honours fsync), peftfx, PEFT and any tool that follows links read all of the old
  save or all of the new one;
- peftfx's reader takes a shared lock on the store (saves take it exclusively) and reads the weights
  from the save folder the config resolved to, so a load racing a save waits for it and gets a matching
  pair; a reader that opens the two files by path at different times (PEFT) can get a mix only if a
  save commits between its two opens;
- tools that copy by content (`shutil.copytree`, `zip`, `huggingface_hub.upload_folder`) copy `.peftfx/`
  as well; exclude it (`ignore_patterns=".peftfx/*"`) or copy links as links (`cp -r`, `tar`, `rsync -a`);
- on a filesystem without symbolic links (Windows without developer mode, FAT) peftfx warns and replaces
  the files one by one, as PEFT does: each file is whole, but an interrupt can leave them mixed.
Saved files get the usual permissions (0o666 & ~umask; folders 0o777 & ~umask).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from .config import DEFAULT_LORA_TARGETS, AdapterConfig, config_from_dict
from .errors import AdapterNotFoundError, CheckpointError, ConfigError
from .virtual_tokens import PROMPT_HEAD_PREFIX, PROMPT_KEY

if TYPE_CHECKING:
    from .model import PeftFxModel
    from .plan import AdapterPlan

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Entry:
    """One tensor of an adapter checkpoint: its PEFT key, where it lives, and its shape."""

    peft_key: str
    owner: str  # "store" (adapter tensor) or "base" (a trained base bias)
    path: str
    shape: tuple


def plan_entries(pm: "PeftFxModel", plan: "AdapterPlan") -> list[Entry]:
    """The tensors an adapter's checkpoint holds, derived from its plan (works before it is added)."""
    store, model = pm.adapters, pm.base_model
    entries = []
    for slot in plan.slots:
        for which, shape in (("A", (slot.r, slot.in_features)), ("B", (slot.out_features, slot.r))):
            entries.append(Entry(f"{PREFIX}{slot.key}.lora_{which}.weight", "store",
                                 store.lora_weight_path(slot.key, plan.name, which), shape))
    for path in plan.saved_paths:
        prefix = store.saved_module_path(path, plan.name)
        for name, tensor in model.get_submodule(path).state_dict(keep_vars=True).items():
            entries.append(Entry(f"{PREFIX}{path}.{name}", "store", f"{prefix}.{name}", tuple(tensor.shape)))
    wrapped = {s.bias_path: s.key for s in plan.slots if s.bias_path}
    for adapter_slots in store.lora.values():
        wrapped.update({s.bias_path: s.key for s in adapter_slots.values() if s.bias_path})
    params = dict(model.named_parameters())
    for name in plan.bias_names:
        key = f"{wrapped[name]}.base_layer.bias" if name in wrapped else name
        entries.append(Entry(f"{PREFIX}{key}", "base", name, tuple(params[name].shape)))
    return entries


def entry_tensor(pm: "PeftFxModel", entry: Entry) -> torch.Tensor:
    root = pm.adapters if entry.owner == "store" else pm.base_model
    module_path, _, name = entry.path.rpartition(".")
    return getattr(root.get_submodule(module_path) if module_path else root, name)


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
                "was this adapter trained for a different model size or rank (check r/rank_pattern)?")
        matched[entry.peft_key] = tensor
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} tensor(s) match nothing in the model, e.g. {unexpected[:3]}; "
            "the adapter was made for another architecture or uses a feature peftfx lacks.")
    missing = [e.peft_key for e in entries if e.peft_key not in matched]
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} adapter tensor(s) are missing, e.g. {missing[:3]}; "
            "the checkpoint is incomplete or its target_modules do not match this model.")
    return matched


def copy_weights(pm: "PeftFxModel", entries: list[Entry], matched: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for entry in entries:
            dest = entry_tensor(pm, entry)
            dest.copy_(matched[entry.peft_key].to(device=dest.device, dtype=dest.dtype))


# -- writing -----------------------------------------------------------------------------------------

STORE = ".peftfx"    # hidden folder inside the save folder that holds the saves
CURRENT = "current"  # link in STORE naming the live save; the one rename that commits a save
SAVE_PREFIX = "save-"
TMP_PREFIX = ".peftfx-tmp-"  # temporary links beside entry files (removed by the next save if killed)
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME)


def save_adapters(pm: "PeftFxModel", directory: str, selected: Optional[Iterable[str]],
                  safe_serialization: bool = True) -> None:
    """Write the selected adapters all-or-nothing: readers see the old save or this one (module doc)."""
    if not safe_serialization:
        warnings.warn("peftfx writes safetensors only; ignoring safe_serialization=False.", stacklevel=3)
    directory = os.fspath(directory)
    names = list(selected) if selected is not None else pm.adapters.adapter_names()
    if not names:
        raise CheckpointError(
            f"save_pretrained({directory!r}): there is no adapter to save (the model has none left, or "
            "selected_adapters is empty); add or load one first, or name existing ones in selected_adapters. "
            "Nothing was written.")
    unknown = [n for n in names if n not in pm.adapters.configs]
    if unknown:
        raise CheckpointError(f"cannot save unknown adapter(s) {unknown}; known: {pm.adapters.adapter_names()}.")
    if STORE in [n.split("/")[0] for n in names]:
        raise CheckpointError(f"an adapter named {STORE!r} would clash with peftfx's save store; rename it.")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"save_pretrained: {directory!r} exists and is a file; give a folder path.")
    made_folder = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    store = os.path.join(directory, STORE)
    made_store = not os.path.isdir(store)
    try:
        os.makedirs(store, exist_ok=True)
        with _locked(store):
            if _links_work(store):
                _save_linked(pm, directory, store, names)
            else:
                warnings.warn(f"{directory!r} is on a filesystem without symbolic links: saving file by file, "
                              "so an interrupted save can leave old and new files mixed.", stacklevel=3)
                _save_plain(pm, directory, names)
        if made_store and not os.path.lexists(os.path.join(store, CURRENT)):
            shutil.rmtree(store, ignore_errors=True)
    except BaseException:
        if made_store and not os.path.lexists(os.path.join(store, CURRENT)):
            shutil.rmtree(store, ignore_errors=True)
        if made_folder:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only if empty: what we made, nothing else
        raise


def _save_linked(pm: "PeftFxModel", directory: str, store: str, names: list[str]) -> None:
    """Stage a complete save folder in the store, link the entry paths, commit with one rename."""
    old = _live_save(store)
    _remove_stale(store, keep=old)
    new = _fresh_name(store, SAVE_PREFIX)
    staged = os.path.join(store, new)
    os.mkdir(staged)
    try:
        subs = set()
        for name in names:
            sub = "" if name == "default" else name
            subs.add(sub)
            _write_adapter(pm, name, os.path.join(staged, sub))
        carried = [rel for rel in (_files_under(os.path.join(store, old)) if old else [])
                   if os.path.dirname(rel) not in subs and _is_our_link(directory, rel)]
        for rel in _files_under(staged):
            old = _link_entry(directory, store, rel, old)
        for rel in carried:  # adapters of the live save this save does not name stay as they are
            dest = os.path.join(staged, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            _link_or_copy(os.path.join(store, old, rel), dest)
        for root, _, _ in os.walk(staged):  # files, folders and links reach the disk before the commit
            _fsync(root)
        for sub in {os.path.dirname(rel) for rel in _files_under(staged)} | {""}:
            _fsync(os.path.join(directory, sub))
        _point(store, new)  # the commit
    except BaseException:
        if _live_save(store) != new:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    _remove_stale(store, keep=new)
    _prune_entries(directory)


def _write_adapter(pm: "PeftFxModel", name: str, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    mode = 0o666 & ~_umask()
    weights = os.path.join(folder, SAFETENSORS_NAME)
    save_file(_adapter_tensors(pm, name), weights, metadata={"format": "pt"})
    os.chmod(weights, mode)  # safetensors writes 0600 through its own temporary file
    config = os.path.join(folder, CONFIG_NAME)
    _write_text(config, json.dumps(_config_for_saving(pm, pm.adapters.configs[name]), indent=2, sort_keys=True))
    os.chmod(config, mode)
    _fsync(weights)
    _fsync(config)


def _link_entry(directory: str, store: str, rel: str, live: Optional[str]) -> Optional[str]:
    """Make `<directory>/<rel>` a link through `.peftfx/current`, without changing what it shows now.

    Returns the live save's name (made here when a plain file is converted and no save is live yet)."""
    path = os.path.join(directory, rel)
    target = _link_target(rel)
    if os.path.islink(path) and os.readlink(path) == target:
        return live
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.lexists(path):
        os.symlink(target, path)  # dangles until the commit: absent, as in the live save
        return live
    if os.path.isdir(path):
        raise CheckpointError(f"cannot save: {path!r} is a folder where the adapter file goes; move it away.")
    # A plain file (from PEFT or an older save): put its bytes into the live save, then swap in the link.
    if live is None:
        live = _fresh_name(store, SAVE_PREFIX)
        os.mkdir(os.path.join(store, live))
        _point(store, live)
    held = os.path.join(store, live, rel)
    os.makedirs(os.path.dirname(held), exist_ok=True)
    tmp = os.path.join(os.path.dirname(held), _fresh_name(os.path.dirname(held), TMP_PREFIX))
    _link_or_copy(path, tmp)
    os.replace(tmp, held)
    _fsync(os.path.dirname(held))
    tmp = os.path.join(os.path.dirname(path), _fresh_name(os.path.dirname(path), TMP_PREFIX))
    os.symlink(target, tmp)
    os.replace(tmp, path)
    return live


def _link_target(rel: str) -> str:
    """Relative link text for entry `rel` (kept relative so the folder can be moved or copied with links)."""
    depth = rel.count("/")
    return "../" * depth + f"{STORE}/{CURRENT}/{rel}"


def _is_our_link(directory: str, rel: str) -> bool:
    path = os.path.join(directory, rel)
    return os.path.islink(path) and os.readlink(path) == _link_target(rel)


def _point(store: str, save: str) -> None:
    """Atomically make `.peftfx/current` name `save` (a new link renamed over the old one)."""
    tmp = os.path.join(store, _fresh_name(store, "current-"))
    os.symlink(save, tmp, target_is_directory=True)
    os.replace(tmp, os.path.join(store, CURRENT))
    _fsync(store)


def _live_save(store: str) -> Optional[str]:
    """The name of the save `.peftfx/current` points at, if it exists."""
    link = os.path.join(store, CURRENT)
    if not os.path.islink(link):
        return None
    name = os.readlink(link)
    return name if os.sep not in name and os.path.isdir(os.path.join(store, name)) else None


def _remove_stale(store: str, keep: Optional[str]) -> None:
    """Remove everything in the store but the live save: old saves, leftovers of killed saves."""
    for entry in os.listdir(store):
        if entry in (CURRENT, keep):
            continue
        path = os.path.join(store, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _prune_entries(directory: str) -> None:
    """Drop dangling entry links and temporary links in the folder and its adapter subfolders."""
    folders = [""] + sorted(e.name for e in os.scandir(directory)
                            if e.name != STORE and e.is_dir(follow_symlinks=False))
    for sub in folders:
        folder = os.path.join(directory, sub)
        removed = False
        for entry in os.listdir(folder):
            rel = os.path.join(sub, entry) if sub else entry
            path = os.path.join(folder, entry)
            stale_tmp = entry.startswith(TMP_PREFIX) and os.path.islink(path)
            if stale_tmp or (entry in ADAPTER_FILES and _is_our_link(directory, rel) and not os.path.exists(path)):
                os.unlink(path)
                removed = True
        if sub and removed and not os.listdir(folder):
            os.rmdir(folder)


def _files_under(folder: str) -> list[str]:
    """Relative paths ('/'-separated) of the files below `folder`."""
    out = []
    for root, _, files in os.walk(folder):
        rel_root = os.path.relpath(root, folder)
        for name in files:
            out.append(name if rel_root == "." else f"{rel_root.replace(os.sep, '/')}/{name}")
    return sorted(out)


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(os.path.realpath(src), dest)
    except OSError:  # no hard links here (or across devices for a foreign link): copy the bytes
        shutil.copy2(src, dest)


def _fresh_name(folder: str, prefix: str) -> str:
    while True:
        name = f"{prefix}{secrets.token_hex(6)}"
        if not os.path.lexists(os.path.join(folder, name)):
            return name


def _links_work(store: str) -> bool:
    if os.path.islink(os.path.join(store, CURRENT)):
        return True
    probe = os.path.join(store, _fresh_name(store, "probe-"))
    try:
        os.symlink(CURRENT, probe)
    except (OSError, NotImplementedError):
        return False
    os.unlink(probe)
    return True


@contextlib.contextmanager
def _locked(store: str, shared: bool = False) -> Iterator[None]:
    """A lock on the store folder: saves take it exclusively (so they take turns), loads shared (so no
    save commits or removes a save folder while they read). Where locks are unavailable, none is taken."""
    try:
        import fcntl
        fd = os.open(store, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _fsync(path: str) -> None:
    """Flush a file or folder to disk, so a power loss cannot reorder the commit before the data."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (setting it races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _save_plain(pm: "PeftFxModel", directory: str, names: list[str]) -> None:
    """Without symbolic links: each file replaced whole, one after another (PEFT's behaviour)."""
    for name in names:
        folder = directory if name == "default" else os.path.join(directory, name)
        os.makedirs(folder, exist_ok=True)
        tensors = _adapter_tensors(pm, name)
        atomic_write(os.path.join(folder, SAFETENSORS_NAME),
                     lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        config = _config_for_saving(pm, pm.adapters.configs[name])
        atomic_write(os.path.join(folder, CONFIG_NAME),
                     lambda tmp, c=config: _write_text(tmp, json.dumps(c, indent=2, sort_keys=True)))


def _adapter_tensors(pm: "PeftFxModel", name: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by PEFT key (prompt learning: PEFT's single `prompt_embeddings`)."""
    prompt = pm.adapters.prompts.get(name)
    if prompt is not None:
        with torch.no_grad():
            tensors = {PROMPT_KEY: prompt.saved_embeddings().detach().contiguous().cpu()}
        for path, clone in pm.adapters.saved.get(name, {}).items():
            for key, t in clone.state_dict().items():
                tensors[f"{PROMPT_HEAD_PREFIX}{path}.{key}"] = t.detach().contiguous().cpu()
        return tensors
    entries = plan_entries(pm, pm.adapter_plan(name))
    return {e.peft_key: entry_tensor(pm, e).detach().contiguous().cpu() for e in entries}


def _config_for_saving(pm: "PeftFxModel", config: AdapterConfig) -> dict[str, Any]:
    data = config.to_dict()
    data["inference_mode"] = True
    if data.get("target_modules", "") is None:
        model_type = getattr(getattr(pm.base_model, "config", None), "model_type", None)
        data["target_modules"] = DEFAULT_LORA_TARGETS.get(model_type)
    if data["base_model_name_or_path"] is None:
        name = getattr(getattr(pm.base_model, "config", None), "_name_or_path", None)
        data["base_model_name_or_path"] = name or None
    return data


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Write one file through a temporary file in the same folder, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        if os.path.isfile(tmp):  # after writing: writers such as safetensors recreate the file as 0600
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.remove(tmp)
        raise


# -- reading -----------------------------------------------------------------------------------------

def resolve_adapter_files(model_id: str, subfolder: Optional[str] = None,
                          revision: Optional[str] = None) -> tuple[str, str]:
    """(config path, weights path) from a local folder or a hub repo id (through huggingface_hub)."""
    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        config_path = os.path.join(local, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise AdapterNotFoundError(f"{local!r} has no {CONFIG_NAME}; is it an adapter folder "
                                       "written by save_pretrained?")
        return _local_pair(local, config_path)
    if not _REPO_ID.match(model_id) or os.path.exists(model_id):
        raise AdapterNotFoundError(f"adapter path {local!r} does not exist; give a folder written by "
                                   "save_pretrained or a hub repo id like 'user/adapter'.")
    return _resolve_from_hub(model_id, subfolder, revision)


def _local_pair(local: str, config_path: str) -> tuple[str, str]:
    """Config and weights of one save: when both are links into peftfx's store, the weights are taken
    from the save folder the config resolved to, so a save committing meanwhile cannot mix them."""
    real_config = os.path.realpath(config_path)
    in_store = f"{os.sep}{STORE}{os.sep}"
    for weights_name in (SAFETENSORS_NAME, BIN_NAME):
        path = os.path.join(local, weights_name)
        if not os.path.isfile(path):
            continue
        if in_store in real_config and in_store in os.path.realpath(path):
            same_save = os.path.join(os.path.dirname(real_config), weights_name)
            if os.path.isfile(same_save):
                return real_config, same_save
        return config_path, path
    raise AdapterNotFoundError(f"{local!r} has {CONFIG_NAME} but no {SAFETENSORS_NAME} or {BIN_NAME}.")


def _resolve_from_hub(repo_id: str, subfolder: Optional[str], revision: Optional[str]) -> tuple[str, str]:
    from huggingface_hub import hf_hub_download

    def fetch(filename: str) -> str:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision)

    try:
        config_path = fetch(CONFIG_NAME)
    except Exception as exc:  # huggingface_hub raises several types (offline, missing repo, ...)
        raise AdapterNotFoundError(
            f"{repo_id!r} is neither a local folder nor a hub adapter peftfx could resolve "
            f"({type(exc).__name__}: {exc}). Check the path, or the repo id and your hub cache.") from exc
    for weights_name in (SAFETENSORS_NAME, BIN_NAME):
        try:
            return config_path, fetch(weights_name)
        except Exception:
            continue
    raise AdapterNotFoundError(f"hub repo {repo_id!r} has {CONFIG_NAME} but no adapter weights file.")


def read_config(config_path: str) -> AdapterConfig:
    """Parse adapter_config.json; an empty or damaged file is a ConfigError naming it."""
    try:
        with open(config_path, "rb") as f:
            raw = f.read()
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        what = "is empty" if not raw.strip() else f"is not valid JSON ({exc})"
        raise ConfigError(f"{config_path}: {what}. The file was damaged or cut short (an interrupted copy or "
                          "download?); save the adapter again or restore the file.") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: holds a JSON {type(data).__name__}, not an object of config fields; "
                          "is it an adapter_config.json written by save_pretrained?")
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
        raise CheckpointError(f"{weights_path}: cannot read the adapter weights ({type(exc).__name__}: {exc}). "
                              "The file is truncated or damaged (an interrupted copy or download?); save the "
                              "adapter again or restore the file.") from exc
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise CheckpointError(f"{weights_path}: holds {type(weights).__name__}, not a state dict of tensors; "
                              "is it an adapter checkpoint?")
    return weights


def read_adapter(model_id: str, subfolder: Optional[str] = None,
                 revision: Optional[str] = None) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    """(config, weights, weights path) of one save, read as a matching pair: a folder saved by peftfx is
    read under a shared lock on its store, so a save in progress is waited for and none commits meanwhile."""
    config_path, _ = resolve_adapter_files(model_id, subfolder, revision)
    store = _store_of(config_path)
    with _locked(store, shared=True) if store else contextlib.nullcontext():
        config_path, weights_path = resolve_adapter_files(model_id, subfolder, revision)
        return read_config(config_path), read_weights(weights_path), weights_path


def _store_of(path: str) -> Optional[str]:
    """The `.peftfx` store a linked entry file resolves into, if any."""
    real = os.path.realpath(path)
    marker = f"{os.sep}{STORE}{os.sep}"
    at = real.rfind(marker)
    return real[:at + len(marker) - 1] if at >= 0 else None


def load_adapter_into(pm: "PeftFxModel", model_id: str, adapter_name: str, is_trainable: bool = False,
                      subfolder: Optional[str] = None, revision: Optional[str] = None) -> None:
    """Read a PEFT-format adapter and add it to `pm` (validated before anything changes)."""
    config, weights, weights_path = read_adapter(model_id, subfolder, revision)
    config.inference_mode = not is_trainable
    pm.add_adapter(adapter_name, config, weights=weights, source=weights_path)
