"""AutoPeftModel: load the base model an adapter names, then the adapter, in one call (PEFT's names).

`AutoPeftModelForCausalLM.from_pretrained("user/adapter")` reads the adapter's adapter_config.json,
loads `base_model_name_or_path` with the transformers Auto class of the adapter's `task_type` (the
class-specific variants use their own class when the config has no task type), and applies the adapter
with `peftfx.load`. The result is a PeftFxModel. transformers is imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from . import hub, io
from .errors import ConfigError

if TYPE_CHECKING:
    from .model import PeftFxModel

DEFAULT_ADAPTER = "default"  # the model layer's name (peftfx.model.DEFAULT_ADAPTER); this module sits below it

# PEFT's task types -> the transformers Auto class that loads such a base model.
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
# peftfx.load's own options (everything else not a hub argument goes to the base model's from_pretrained).
_LOAD_OPTIONS = ("example_inputs", "dynamic_axes", "quantization")
TOKENIZER_CONFIG = "tokenizer_config.json"


class _AutoPeftModelBase:
    """Not instantiated: use `from_pretrained`."""

    task_type: ClassVar[Optional[str]] = None  # None: chosen from the adapter's task_type

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is not instantiated; use {type(self).__name__}.from_pretrained(...).")

    @classmethod
    def from_pretrained(
        cls,
        adapter_id_or_path: str,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        revision: Optional[str] = None,
        subfolder: Optional[str] = None,
        **kwargs: Any,
    ) -> "PeftFxModel":
        """Load the adapter's base model and the adapter on it.

        `revision` and `subfolder` locate the adapter; the base model is loaded at the config's own
        `revision`, as PEFT does. Hub arguments (cache_dir, token, local_files_only, force_download, ...)
        are used for both; peftfx.load's example_inputs, dynamic_axes and quantization go to it; any other
        keyword (torch_dtype/dtype, device_map, attn_implementation, trust_remote_code, ...) goes to the
        base model's `from_pretrained`."""
        hub_names = hub.download_parameters() | {"use_auth_token", "proxies"}
        hub_kwargs = {k: v for k, v in kwargs.items() if k in hub_names}
        load_options = {k: kwargs[k] for k in _LOAD_OPTIONS if k in kwargs}
        model_kwargs = {k: v for k, v in kwargs.items() if k not in hub_kwargs and k not in load_options}
        download = hub.download_kwargs(hub_kwargs, f"{cls.__name__}.from_pretrained")
        config_path, _ = io.resolve_adapter_files(adapter_id_or_path, subfolder, revision, **hub_kwargs)
        config = io.read_config(config_path)
        base = config.base_model_name_or_path
        if not base:
            raise ConfigError(
                f"{config_path} has no base_model_name_or_path, so the base model is unknown; load it yourself "
                "and use peftfx.load(model, adapter)."
            )
        auto_class = cls._auto_class(config.task_type, getattr(config, "auto_mapping", None), config_path)
        base_kwargs = {k: v for k, v in download.items() if k in _TRANSFORMERS_HUB_KWARGS}
        model = auto_class.from_pretrained(base, revision=config.revision, **base_kwargs, **model_kwargs)
        _resize_to_tokenizer(model, adapter_id_or_path, subfolder, revision, download, base_kwargs, model_kwargs)
        from .api import load

        return load(
            model,
            adapter_id_or_path,
            adapter_name,
            is_trainable=is_trainable,
            subfolder=subfolder,
            revision=revision,
            **load_options,
            **hub_kwargs,
        )

    @classmethod
    def _auto_class(cls, task_type: Optional[str], auto_mapping: Optional[dict[str, Any]], source: str) -> Any:
        import transformers

        if task_type is not None and task_type not in TASK_AUTO_CLASSES:
            raise ConfigError(f"{source}: task_type {task_type!r} is unknown; known: {sorted(TASK_AUTO_CLASSES)}.")
        if cls.task_type is not None:
            if task_type is not None and task_type != cls.task_type:
                raise ConfigError(
                    f"{source}: the adapter's task_type is {task_type!r} but {cls.__name__} loads "
                    f"{cls.task_type!r} models; use {_CLASS_FOR_TASK[task_type]}."
                )
            return getattr(transformers, TASK_AUTO_CLASSES[cls.task_type])
        if task_type is not None:
            return getattr(transformers, TASK_AUTO_CLASSES[task_type])
        # PEFT's auto_mapping names the base class; only transformers' own classes are imported
        name = (auto_mapping or {}).get("base_model_class")
        library = str((auto_mapping or {}).get("parent_library", ""))
        if name and (library == "transformers" or library.startswith("transformers.")) and hasattr(transformers, name):
            return getattr(transformers, name)
        raise ConfigError(
            f"{source} has no task_type, so AutoPeftModel cannot choose the model class; use the class for "
            "the task, e.g. AutoPeftModelForCausalLM or AutoPeftModelForSequenceClassification."
        )


# hub arguments transformers' from_pretrained takes too
_TRANSFORMERS_HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download")


def _resize_to_tokenizer(
    model: Any,
    adapter: str,
    subfolder: Optional[str],
    revision: Optional[str],
    download: dict[str, Any],
    base_kwargs: dict[str, Any],
    model_kwargs: dict[str, Any],
) -> None:
    """PEFT's step: an adapter saved with a tokenizer larger than the base vocabulary (added tokens)
    resizes the base model's embeddings to it before the adapter is applied."""
    local = os.path.join(adapter, subfolder) if subfolder else adapter
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, TOKENIZER_CONFIG)):
            return
        source, extra = local, {}
    else:
        filename = f"{subfolder}/{TOKENIZER_CONFIG}" if subfolder else TOKENIZER_CONFIG
        if hub.try_download(adapter, filename, revision, download) is None:
            return
        source, extra = adapter, {"subfolder": subfolder, "revision": revision, **base_kwargs}
    if not hasattr(model, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    trust = model_kwargs.get("trust_remote_code", False)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust, **extra)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_AutoPeftModelBase):
    """The model class from the adapter's task_type (or PEFT's auto_mapping)."""


class AutoPeftModelForCausalLM(_AutoPeftModelBase):
    task_type = "CAUSAL_LM"


class AutoPeftModelForSequenceClassification(_AutoPeftModelBase):
    task_type = "SEQ_CLS"


class AutoPeftModelForSeq2SeqLM(_AutoPeftModelBase):
    task_type = "SEQ_2_SEQ_LM"


class AutoPeftModelForTokenClassification(_AutoPeftModelBase):
    task_type = "TOKEN_CLS"


class AutoPeftModelForQuestionAnswering(_AutoPeftModelBase):
    task_type = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(_AutoPeftModelBase):
    task_type = "FEATURE_EXTRACTION"


_CLASS_FOR_TASK = {
    c.task_type: c.__name__
    for c in (
        AutoPeftModelForCausalLM,
        AutoPeftModelForSequenceClassification,
        AutoPeftModelForSeq2SeqLM,
        AutoPeftModelForTokenClassification,
        AutoPeftModelForQuestionAnswering,
        AutoPeftModelForFeatureExtraction,
    )
}
