"""Models already quantized by bitsandbytes (transformers' `quantization_config=BitsAndBytesConfig(...)`).

Their `bnb.nn.Linear4bit` / `Linear8bitLt` layers keep weights in tensor subclasses that torch.export
cannot trace. `adopt_bnb_modules` turns each such layer into a plain `nn.Linear` with a hollow weight
(and the layer's own bias) and moves the packed bytes and quantization state into a QuantStore *by
reference*: nothing is dequantized or copied. The quantize pass then reads them as in a model peftfx
quantized itself. `to_bnb_modules` is the way back (unload, merge_and_unload), rebuilding bitsandbytes
layers around the store's tensors.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .quant_config import QuantConfig, require_bitsandbytes
from .quant_store import AnyQuantizedWeight, QuantStore, Weight4bit, Weight8bit, hollow


def _is_bnb_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes.")


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _plain_linear(
    in_features: int, out_features: int, bias: Optional[nn.Parameter], dtype: torch.dtype, device: torch.device
) -> nn.Linear:
    """An nn.Linear whose weight is hollow (see quant_store), carrying the original bias parameter."""
    layer = nn.Linear(in_features, out_features, bias=False, device="meta")
    stand_in = torch.empty((), dtype=dtype, device=device).expand(out_features, in_features)
    layer.weight = nn.Parameter(hollow(stand_in), requires_grad=False)
    layer.bias = bias  # type: ignore[assignment]  # mypy infers Parameter from nn.Linear; None means no bias
    return layer


def _adopt_4bit(module: Any) -> tuple[Weight4bit, torch.dtype]:  # a bnb.nn.Linear4bit (bitsandbytes is untyped)
    packed, state = module.weight.data, module.weight.quant_state
    compute_dtype = getattr(module, "compute_dtype", None)
    if getattr(state, "packing_format_for_cpu", False):
        return _adopt_cpu_packed(packed, state, compute_dtype)
    return Weight4bit.from_state(packed, state, compute_dtype), state.dtype


def _adopt_cpu_packed(
    packed: torch.Tensor, state, compute_dtype: Optional[torch.dtype]
) -> tuple[Weight4bit, torch.dtype]:
    """A layer bnb already repacked for its AVX512-BF16 kernel (an eval forward under no_grad on such a CPU
    does that, in place). Repacking keeps the 4-bit codes but dequantizes a double-quantized absmax and
    rounds it to bf16, stored transposed. bnb's inverse restores the codes' layout, but re-quantizes a
    nested absmax (a second rounding) and leaves a plain one transposed, so only the codes are taken from
    it; absmax is kept as the layer has it (bf16 values, as float32): exactly the weight bnb's kernel uses."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    absmax = state.absmax.T.reshape(-1).float()  # packed layout: (in / blocksize, out), bf16
    packed, state = _convert_weight_packed_for_cpu_inverse(packed, state)
    weight = Weight4bit(
        tuple(state.shape),
        state.dtype,
        state.blocksize,
        state.quant_type,
        compute_dtype,
        {"packed": packed.view(torch.uint8), "absmax": absmax},
    )
    return weight, state.dtype


def _adopt_8bit(module: Any, dtype: torch.dtype) -> tuple[Weight8bit, torch.dtype]:  # a bnb.nn.Linear8bitLt
    cb = module.weight.data if module.state.CB is None else module.state.CB
    scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
    if cb.dtype != torch.int8 or scb is None:
        raise ValueError(
            f"{type(module).__name__} holds no int8 weight yet (has_fp16_weights=True or not moved "
            "to its device); peftfx adopts quantized layers only."
        )
    shape = (module.out_features, module.in_features)
    return Weight8bit(shape, dtype, module.state.threshold, cb, scb), dtype


def adopt_bnb_modules(model: nn.Module) -> Optional[QuantStore]:
    """Replace the model's bitsandbytes linear layers by plain ones over a QuantStore (no dequantizing).
    Returns None when the model has no bitsandbytes layer."""
    layers = [(path, m) for path, m in model.named_modules() if _is_bnb_layer(m)]
    if not layers:
        return None
    bnb = require_bitsandbytes()
    float_dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    store = QuantStore(_config_of(model))
    before = 0
    packed: AnyQuantizedWeight
    for path, module in layers:
        if isinstance(module, bnb.nn.Linear4bit):
            packed, dtype = _adopt_4bit(module)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            packed, dtype = _adopt_8bit(module, module.bias.dtype if module.bias is not None else float_dtype)
        else:
            raise TypeError(
                f"{path}: bitsandbytes layer {type(module).__name__} is not supported by peftfx "
                "(Linear4bit and Linear8bitLt are)."
            )
        device = module.weight.device
        layer = _plain_linear(module.in_features, module.out_features, module.bias, dtype, device)
        _set_child(model, path, layer)
        store.add(f"{path}.weight", layer.weight, packed)
        before += module.in_features * module.out_features * dtype.itemsize
    store.bytes_before = before
    return store


def _config_of(model: nn.Module) -> Optional[QuantConfig]:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    from .quant_config import as_quant_config

    try:
        return as_quant_config(config)
    except Exception:  # informational only: the layers themselves carry their formats
        return None


def to_bnb_modules(model: nn.Module, store: QuantStore) -> None:
    """Turn every hollow linear of `model` back into a bitsandbytes layer over the store's tensors."""
    bnb = require_bitsandbytes()
    functional = bnb.functional
    for weight_path, packed in list(store.items()):
        path = weight_path[: -len(".weight")]
        old = model.get_submodule(path)
        out_features, in_features = packed.shape
        has_bias = old.bias is not None
        if packed.bits == 4:
            state2 = None
            if packed.nested:
                state2 = functional.QuantState(
                    absmax=packed.nested_absmax, code=packed.nested_code, blocksize=256, dtype=torch.float32
                )
            state = functional.QuantState(
                absmax=packed.absmax,
                shape=torch.Size(packed.shape),
                code=functional.get_4bit_type(packed.quant_type, device=packed.packed.device),
                blocksize=packed.blocksize,
                quant_type=packed.quant_type,
                dtype=packed.dtype,
                offset=packed.offset if packed.nested else None,
                state2=state2,
            )
            layer = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=has_bias,
                compute_dtype=packed.compute_dtype,
                compress_statistics=packed.nested,
                quant_type=packed.quant_type,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                packed.packed,
                requires_grad=False,
                quant_state=state,
                blocksize=packed.blocksize,
                compress_statistics=packed.nested,
                quant_type=packed.quant_type,
                bnb_quantized=True,
                module=layer,
            )
        else:
            layer = bnb.nn.Linear8bitLt(
                in_features,
                out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=packed.threshold,
                device="meta",
            )
            weight = bnb.nn.Int8Params(packed.CB, requires_grad=False, has_fp16_weights=False)
            weight.CB, weight.SCB = packed.CB, packed.SCB
            layer.weight = weight
        layer.bias = old.bias
        layer.train(old.training)  # a fresh module is in train mode; bnb picks its CPU kernel by this flag
        _set_child(model, path, layer)
        store.remove(weight_path)
