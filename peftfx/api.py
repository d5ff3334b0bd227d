"""The entry points: `apply` a config to a model, `load` a saved adapter onto a model."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from .model import DEFAULT_ADAPTER, PeftFxModel

ExampleInputs = Union[dict[str, Any], tuple[Any, ...], None]


def apply(
    model: torch.nn.Module,
    config: Any,
    adapter_name: str = DEFAULT_ADAPTER,
    example_inputs: ExampleInputs = None,
    dynamic_axes: Optional[dict[str, dict[int, str]]] = None,
    quantization: Any = None,
) -> PeftFxModel:
    """Capture `model` and add an adapter described by `config` (a peftfx or peft config).

    transformers models need no example inputs; any other nn.Module needs `example_inputs` (a dict of
    keyword inputs or a tuple of positional ones). `dynamic_axes` ({input: {dim: name}}) overrides which
    dims are dynamic; by default dim 0 (and the sequence dim of HF token inputs) are.
    `quantization` (a QuantConfig or transformers BitsAndBytesConfig) first stores the base linears in
    bitsandbytes 4-bit or 8-bit form: QLoRA is `apply(model, LoraConfig(...), quantization=QuantConfig(...))`.
    """
    pm = PeftFxModel(model, example_inputs=example_inputs, dynamic_axes=dynamic_axes)
    if quantization is not None:
        pm.quantize(quantization)
    pm.add_adapter(adapter_name, config)
    return pm


def quantize(
    model: torch.nn.Module,
    config: Any,
    example_inputs: ExampleInputs = None,
    dynamic_axes: Optional[dict[str, dict[int, str]]] = None,
) -> PeftFxModel:
    """Capture `model` with its base linears in bitsandbytes 4-bit or 8-bit form and no adapter yet
    (add some with `add_adapter`). `pm.quantization_report` holds the bytes before and after."""
    pm = PeftFxModel(model, example_inputs=example_inputs, dynamic_axes=dynamic_axes)
    pm.quantization_report = pm.quantize(config)
    return pm


def load(
    model: torch.nn.Module,
    model_id: str,
    adapter_name: str = DEFAULT_ADAPTER,
    is_trainable: bool = False,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    example_inputs: ExampleInputs = None,
    dynamic_axes: Optional[dict[str, dict[int, str]]] = None,
    quantization: Any = None,
    **hub_kwargs: Any,
) -> PeftFxModel:
    """Load an adapter saved by peftfx or HF PEFT (a folder or a hub repo id) onto `model`.

    As with `PeftModel.from_pretrained`, the adapter is frozen unless `is_trainable=True`.
    `quantization` quantizes the base linears first, as in `apply`. `hub_kwargs` are PEFT's download
    arguments for a repo id (cache_dir, token, local_files_only, force_download, ...), passed to
    huggingface_hub's hf_hub_download; an unknown name is a ConfigError before the model is captured.
    """
    from . import hub

    hub.download_kwargs(hub_kwargs)  # refuse a misspelt argument before the (slow) capture
    pm = PeftFxModel(model, example_inputs=example_inputs, dynamic_axes=dynamic_axes)
    if quantization is not None:
        pm.quantize(quantization)
    pm.load_adapter(
        model_id, adapter_name, is_trainable=is_trainable, subfolder=subfolder, revision=revision, **hub_kwargs
    )
    return pm


def get_peft_model(
    model: torch.nn.Module,
    peft_config: Any,
    adapter_name: str = DEFAULT_ADAPTER,
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
) -> PeftFxModel:
    """PEFT's `get_peft_model`, so a PEFT script changes one import: `peftfx.apply`. `mixed` (PEFT's
    PeftMixedModel) is refused; the other options change nothing here (adapters are float32 tensors of
    their own, as PEFT's autocast_adapter_dtype makes them; nothing is loaded from `revision`)."""
    if mixed:
        from .errors import ConfigError

        raise ConfigError(
            "get_peft_model(mixed=True) (PEFT's PeftMixedModel) is not supported; add adapters of one kind "
            "with add_adapter(), or use a separate peftfx.apply per adapter type."
        )
    return apply(model, peft_config, adapter_name=adapter_name)
