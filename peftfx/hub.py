"""The Hugging Face hub: resolving adapter files through huggingface_hub, and `push_to_hub`.

Downloads go through `huggingface_hub.hf_hub_download` with PEFT's keyword arguments (cache_dir, token,
local_files_only, force_download, ...), so the hub cache, offline mode and authentication behave as they
do for PEFT and transformers. Uploads write the adapter with the ordinary save path into a temporary
folder, copy the adapter files (never the `.peftfx/` save store) and a model card into a clean folder,
and hand that to `HfApi.upload_folder`. huggingface_hub is imported on first use.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Optional

from .errors import AdapterNotFoundError, ConfigError

if TYPE_CHECKING:
    from .methods.base import MethodEnv

# The names PEFT users pass most; every other keyword of hf_hub_download is accepted as well.
HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "proxies", "repo_type", "user_agent")
# hf_hub_download's own parameters that the caller names separately (or that make no sense here).
_NOT_PASSED = ("repo_id", "filename", "subfolder", "revision", "dry_run", "local_dir", "tqdm_class")
_TRUE = ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    """HF_HUB_OFFLINE as it is now. huggingface_hub reads the variable once, at import; a process that set
    it later (a test's conftest, a notebook cell) would otherwise wait through network retries."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def download_parameters() -> set[str]:
    from huggingface_hub import hf_hub_download

    return set(inspect.signature(hf_hub_download).parameters) - set(_NOT_PASSED)


def download_kwargs(kwargs: dict[str, Any], caller: str = "load") -> dict[str, Any]:
    """Check PEFT's hub keyword arguments and return what hf_hub_download takes. `use_auth_token` (PEFT's
    old name) becomes `token`; an unknown name is a ConfigError naming it, not silently ignored."""
    accepted = download_parameters()
    out: dict[str, Any] = {}
    unknown = []
    for key, value in kwargs.items():
        if key == "use_auth_token":
            out.setdefault("token", value)
        elif key == "proxies" and key not in accepted:
            if value:
                raise ConfigError(
                    f"{caller}(proxies=...): this huggingface_hub ({_hub_version()}) has no `proxies` argument; "
                    "set the HTTPS_PROXY / HTTP_PROXY environment variables instead."
                )
        elif key in accepted:
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        names = sorted(accepted | {"use_auth_token"})
        raise ConfigError(
            f"{caller}() got unknown keyword argument(s) {sorted(unknown)}; the hub arguments it takes are "
            f"{names} (plus subfolder and revision). Check the spelling, or drop arguments PEFT ignores."
        )
    if offline():
        out["local_files_only"] = True
    return out


def _hub_version() -> str:
    import huggingface_hub

    return str(huggingface_hub.__version__)


def resolve_adapter(
    repo_id: str,
    subfolder: Optional[str],
    revision: Optional[str],
    hub_kwargs: dict[str, Any],
    config_name: str,
    weights_names: tuple[str, ...],
) -> tuple[str, str]:
    """(config path, weights path) of an adapter in a hub repo, from the cache or downloaded."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    kwargs = dict(hub_kwargs)
    if kwargs.get("local_files_only") and kwargs.get("force_download"):
        why = "HF_HUB_OFFLINE is set" if offline() else "local_files_only=True"
        raise ConfigError(
            f"force_download=True for {repo_id!r} cannot download anything: {why}. Drop force_download to "
            "use the cached files, or go online."
        )

    def fetch(filename: str) -> str:
        return str(hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, **kwargs))

    where = (
        f"{repo_id!r}"
        + (f" (subfolder {subfolder!r})" if subfolder else "")
        + (f" at revision {revision!r}" if revision else "")
    )
    try:
        config_path = fetch(config_name)
    except Exception as exc:  # huggingface_hub raises several types (offline, missing repo, auth, ...)
        if kwargs.get("local_files_only"):
            why = (
                "HF_HUB_OFFLINE is set" if offline() else "local_files_only=True"
            ) + f" and the hub cache ({kwargs.get('cache_dir') or _cache_dir()}) does not hold it"
            hint = "download it once online (or unset HF_HUB_OFFLINE), or pass the right cache_dir"
        else:
            why = f"{type(exc).__name__}: {exc}"
            hint = "check the path, or the repo id, revision and token"
        raise AdapterNotFoundError(
            f"{where} is neither a local folder nor a hub adapter peftfx could resolve ({why}); {hint}."
        ) from exc
    for weights_name in weights_names:
        try:
            return config_path, fetch(weights_name)
        except EntryNotFoundError:
            continue
    raise AdapterNotFoundError(
        f"hub repo {where} has {config_name} but no adapter weights ({', '.join(weights_names)})."
    )


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def try_download(repo_id: str, filename: str, revision: Optional[str], hub_kwargs: dict[str, Any]) -> Optional[str]:
    """A file of a hub repo if it exists (cached or downloaded), else None."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled

    try:
        return str(hf_hub_download(repo_id, filename, revision=revision, **hub_kwargs))
    except (EntryNotFoundError, OfflineModeIsEnabled):
        return None


# -- pushing -----------------------------------------------------------------------------------------


def push_to_hub(
    env: "MethodEnv",
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Any] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    selected_adapters: Optional[list[str]] = None,
    tags: Optional[list[str]] = None,
) -> Any:
    """Upload the adapters as PEFT does: adapter_config.json + adapter_model.safetensors (the default adapter
    at the top, others in `<name>/`) and a README.md model card naming the base model. Returns the
    CommitInfo of huggingface_hub's upload."""
    from huggingface_hub import HfApi

    from . import io

    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model").repo_id
    with tempfile.TemporaryDirectory(prefix="peftfx-push-") as tmp:
        saved, upload = os.path.join(tmp, "saved"), os.path.join(tmp, "upload")
        io.save_adapters(env, saved, selected_adapters)
        names = list(selected_adapters) if selected_adapters is not None else env.store.adapter_names()
        for name in names:
            part = "" if name == "default" else name
            os.makedirs(os.path.join(upload, part), exist_ok=True)
            for filename in io.ADAPTER_FILES:  # copies the files the save links name, not the store
                shutil.copyfile(os.path.join(saved, part, filename), os.path.join(upload, part, filename))
        card = model_card(env, names, repo_id, revision, token, tags)
        with open(os.path.join(upload, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=upload,
            commit_message=commit_message or "Upload adapter (peftfx)",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def model_card(
    env: "MethodEnv", names: list[str], repo_id: str, revision: Optional[str], token: Any, tags: Optional[list[str]]
) -> str:
    """PEFT's model card fields (library_name: peft, base_model, its tags, pipeline_tag for causal LMs),
    updating the repo's existing README.md if it has one, plus `peftfx` in the tags."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__, io

    data = io.saved_config_dict(env, names[0])
    base = data.get("base_model_name_or_path")
    existing = None if offline() else try_download(repo_id, "README.md", revision, {"token": token})
    card = ModelCard.load(existing) if existing else None
    card_data = card.data if card is not None else ModelCardData()
    card_data.library_name = "peft"
    if base:
        card_data.base_model = base
    wanted = list(card_data.tags or []) + list(tags or [])
    model = env.model
    if hasattr(model, "config") and hasattr(model, "get_input_embeddings"):
        wanted.append("transformers")
    methods = {str(env.store.configs[n].peft_type).lower() for n in names}
    wanted += sorted(methods) + ([f"base_model:adapter:{base}"] if base else []) + ["peftfx"]
    card_data.tags = sorted(dict.fromkeys(wanted))
    if not card_data.pipeline_tag and data.get("task_type") == "CAUSAL_LM":
        card_data.pipeline_tag = "text-generation"
    text = card.text if card is not None else _card_text(repo_id, base, names)
    versions = f"- peftfx {__version__}"
    if versions not in text:
        text = text.rstrip("\n") + f"\n\n### Framework versions\n\n{versions}\n"
    return f"---\n{card_data.to_yaml()}\n---\n{text}"


def _card_text(repo_id: str, base: Optional[str], names: list[str]) -> str:
    name = repo_id.split("/")[-1]
    on = f" for [{base}](https://huggingface.co/{base})" if base and not os.path.isabs(base) else ""
    extra = [n for n in names if n != "default"]
    folders = f"\n\nMore adapters in sub-folders: {', '.join(extra)}." if extra else ""
    return (
        f"\n# {name}\n\nA PEFT-format adapter{on}, saved with peftfx. It loads with HF PEFT "
        f"(`PeftModel.from_pretrained(base, {repo_id!r})`) or peftfx (`peftfx.load(base, {repo_id!r})`)."
        f"{folders}\n"
    )
