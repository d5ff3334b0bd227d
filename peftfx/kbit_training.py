"""Getting a quantized model ready for QLoRA training, as PEFT's `prepare_model_for_kbit_training` does.

One call, before `peftfx.apply`: every base parameter is frozen; half-precision parameters that are not
4-bit packed weights (norms, embeddings, the head) become fp32, so their updates and the loss are not
rounded to 16 bits; and for a k-bit model, activation checkpointing is switched on with the input
embeddings' output requiring grad (reentrant checkpointing of the first layer needs an input that does,
or the adapters inside it get no gradient). peftfx's block calls honour those switches
(peftfx/checkpointing.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

HALF = (torch.float16, torch.bfloat16)
# Quantization methods whose weights are not bitsandbytes' and whose other parameters are left as they are.
OTHER_QUANTIZERS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """Freeze, upcast and switch checkpointing on, in place (PEFT's name, arguments and defaults); returns
    the model."""
    kwargs = dict(gradient_checkpointing_kwargs or {})
    method = getattr(model, "quantization_method", None)
    method = str(getattr(method, "value", method)).lower() if method is not None else None
    other = method in OTHER_QUANTIZERS or getattr(model, "hqq_quantized", False)
    kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    for param in model.parameters():
        param.requires_grad = False
    if not other:
        for param in model.parameters():
            if param.dtype in HALF and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
    if (kbit or other) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            _inputs_require_grad(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    return model


def _inputs_require_grad(model: nn.Module) -> None:
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return

    def require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(require_grad)  # type: ignore[operator]
