"""Quantize: run the targeted base linears on bitsandbytes 4-bit or 8-bit weights.

Two halves, like merge: `quantize_model` changes weights once (packs each targeted weight with
bitsandbytes into the quant store and hollows the full-precision parameter), and the rules rewrite every
variant graph to read the packed weight instead, through bitsandbytes' registered ops, which export
and compile. The graph math is bitsandbytes' own module math, op for op:

4-bit (bnb Linear4bit: MatMul4Bit / gemm_4bit's reference path)
    y = linear(x, W, b)  ->  absmax = absmax            (double quant: dequantize_blockwise(...) + offset)
                             w = dequantize_4bit(packed, absmax, blocksize, quant_type, shape, compute)
                             y = linear(x.to(compute), w, b.to(compute)).to(x.dtype)

8-bit (bnb Linear8bitLt, LLM.int8)
    eval:   CA, SCA, outliers = int8_vectorwise_quant(x2d.half(), threshold)
            y = int8_mixed_scaled_mm(x2d, CA, CB, SCA, SCB, outliers, b)   (threshold 0: int8_scaled_mm)
    train:  w = CB.to(x.dtype) * (SCB / 127);  y = linear(x, w, b)          (MatMul8bitFp, bnb's CPU path)

The 4-bit path and the 8-bit train path keep an `aten.linear`, so autograd gives the input gradient
(LoRA layers below a quantized one still train); the packed weights themselves get none. The pass runs
after `lora`: LoRA adds its path to the linear's output, and this pass then swaps the linear underneath.
"""
from __future__ import annotations

import operator
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

from peftfx.adapters import MOUNT
from peftfx.errors import ConfigError, TargetNotFoundError
from peftfx.quant_config import QuantConfig, as_quant_config, require_bitsandbytes
from peftfx.quant_store import (NESTED_BLOCKSIZE, QUANT_MOUNT, QuantStore, Weight4bit, Weight8bit, hollow,
                                storage_bytes)
from peftfx.rewrite import Builder, Rule, read_tensor
from peftfx.select import linear_sites, output_head_path

from .context import PassContext

aten = torch.ops.aten
NAME = "quantize"
MAX_NUMEL = 2 ** 31 - 1  # bitsandbytes' kernels index packed weights with 32-bit integers


# -- the graph rules ---------------------------------------------------------------------------------

def _quantized_path(node: fx.Node, ctx: PassContext) -> Optional[str]:
    if ctx.quant is None or node.op != "call_function" or node.target != aten.linear.default:
        return None
    weight = read_tensor(node.args[1])
    return ctx.quant.path_of(weight) if weight is not None else None


def _is_4bit(node: fx.Node, ctx: PassContext) -> bool:
    path = _quantized_path(node, ctx)
    return path is not None and ctx.quant.get(path).bits == 4


def _is_8bit(node: fx.Node, ctx: PassContext) -> bool:
    path = _quantized_path(node, ctx)
    return path is not None and ctx.quant.get(path).bits == 8


def _reads_hollow_copy(node: fx.Node, ctx: PassContext) -> bool:
    """A modules_to_save copy of a quantized module would copy the hollow weight: refuse it."""
    if ctx.quant is None or node.op != "get_attr" or not node.target.startswith(f"{MOUNT}."):
        return False
    if ".modules_to_save." not in node.target or not node.target.endswith(".weight"):
        return False
    module = node.target[len(MOUNT) + 1:].split(".modules_to_save.")[0]
    return ctx.quant.holds(f"{module}.weight")


def _refuse_copy(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    module = node.target[len(MOUNT) + 1:].split(".modules_to_save.")[0]
    raise ConfigError(f"module {module!r} is quantized, so modules_to_save cannot train a copy of it; keep it in "
                      f"full precision with QuantConfig(llm_int8_skip_modules=[{module.rsplit('.', 1)[-1]!r}]).")


@dataclass(frozen=True)
class _Site:
    """A quantized linear node's inputs and the packed weight it reads."""

    weight: torch.nn.Module  # Weight4bit | Weight8bit
    prefix: str  # get_attr path of the weight's buffers in the variant graph
    x: fx.Node
    bias: Optional[fx.Node]
    x_dtype: torch.dtype
    bias_dtype: Optional[torch.dtype]


def _site(node: fx.Node, ctx: PassContext, b: Builder) -> _Site:
    path = _quantized_path(node, ctx)
    weight = ctx.quant.get(path)
    x, bias = node.args[0], (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
    x_dtype = x.meta["val"].dtype if "val" in x.meta else weight.dtype
    bias_tensor = read_tensor(bias)
    return _Site(weight, f"{QUANT_MOUNT}.{QuantStore.module_path(path)}", x, bias, x_dtype,
                 bias_tensor.dtype if bias_tensor is not None else None)


def _linear_4bit(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    site = _site(node, ctx, b)
    weight, prefix, x, bias, x_dtype = site.weight, site.prefix, site.x, site.bias, site.x_dtype
    ops = torch.ops.bitsandbytes
    absmax = b.get_attr(f"{prefix}.absmax")
    if weight.nested:
        absmax = b.call(ops.dequantize_blockwise.default, absmax, b.get_attr(f"{prefix}.nested_absmax"),
                        b.get_attr(f"{prefix}.nested_code"), NESTED_BLOCKSIZE, torch.float32)
        absmax = b.call(aten.add.Tensor, absmax, b.get_attr(f"{prefix}.offset"))
    compute = weight.compute_dtype or x_dtype
    w = b.call(ops.dequantize_4bit.default, b.get_attr(f"{prefix}.packed"), absmax, weight.blocksize,
               weight.quant_type, list(weight.shape), compute)
    if x_dtype != compute:
        x = b.call(aten.to.dtype, x, compute)
    if bias is not None and site.bias_dtype != compute:
        bias = b.call(aten.to.dtype, bias, compute)
    y = b.call(aten.linear.default, x, w, bias)
    if x_dtype != compute:
        y = b.call(aten.to.dtype, y, x_dtype)
    b.replace_uses(node, y)


def _linear_8bit(node: fx.Node, ctx: PassContext, b: Builder) -> None:
    site = _site(node, ctx, b)
    weight, prefix, x, bias, x_dtype = site.weight, site.prefix, site.x, site.bias, site.x_dtype
    ops = torch.ops.bitsandbytes
    if bias is not None and site.bias_dtype != x_dtype:
        bias = b.call(aten.to.dtype, bias, x_dtype)
    cb, scb = b.get_attr(f"{prefix}.CB"), b.get_attr(f"{prefix}.SCB")
    if ctx.training:  # bitsandbytes' CPU training path: dequantize the int8 rows, then a plain linear
        scale = b.call(aten.mul.Tensor, b.call(aten.unsqueeze.default, scb, 1), 1.0 / 127.0)
        w = b.call(aten.mul.Tensor, b.call(aten.to.dtype, cb, x_dtype), scale)
        if x_dtype != torch.float32:
            w = b.call(aten.to.dtype, w, x_dtype)
        b.replace_uses(node, b.call(aten.linear.default, x, w, bias))
        return
    rank = x.meta["val"].dim() if "val" in x.meta else 3
    flat = b.call(aten.reshape.default, x, [-1, weight.shape[1]])
    quant = b.call(ops.int8_vectorwise_quant.default, b.call(aten.to.dtype, flat, torch.float16), weight.threshold)
    ca, sca = b.call(operator.getitem, quant, 0), b.call(operator.getitem, quant, 1)
    if weight.threshold > 0:
        outliers = b.call(operator.getitem, quant, 2)
        mixed = b.call(ops.int8_mixed_scaled_mm.default, flat, ca, cb, sca, scb, outliers, bias)
        y2d = b.call(operator.getitem, mixed, 0)
    else:
        y2d = b.call(ops.int8_scaled_mm.default, ca, cb, sca, scb, bias=bias, dtype=x_dtype)
    sizes = [b.call(aten.sym_size.int, x, i) for i in range(rank - 1)] + [weight.shape[0]]
    b.replace_uses(node, b.call(aten.reshape.default, y2d, sizes))


RULES = (
    Rule("saved_copy", _reads_hollow_copy, _refuse_copy),
    Rule("linear4bit", _is_4bit, _linear_4bit),
    Rule("linear8bit", _is_8bit, _linear_8bit),
)


# -- the weight transform ------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantReport:
    """What quantize_model did: how many linears, and the bytes of their weights before and after."""

    bits: int
    linears: int
    bytes_before: int
    bytes_after: int
    skipped: tuple[str, ...]  # linear weights left in full precision (head, skip list, shared weights)

    def __str__(self) -> str:
        ratio = self.bytes_before / max(self.bytes_after, 1)
        return (f"quantized {self.linears} linears to {self.bits}-bit: weights {self.bytes_before:,d} -> "
                f"{self.bytes_after:,d} bytes ({ratio:.1f}x smaller); kept in full precision: "
                f"{list(self.skipped)}")


def check_quantizable(key: str, weight: torch.Tensor, config: QuantConfig) -> None:
    """Refuse weights bitsandbytes cannot pack (the ragged last block of any 2-D weight is padded)."""
    if weight.dim() != 2 or weight.numel() == 0:
        raise ConfigError(f"layer {key!r}: weight of shape {tuple(weight.shape)} cannot be quantized (bitsandbytes "
                          "packs non-empty 2-D weights only); add it to llm_int8_skip_modules.")
    if weight.numel() > MAX_NUMEL:
        raise ConfigError(f"layer {key!r}: weight of shape {tuple(weight.shape)} has {weight.numel():,d} elements, "
                          f"more than bitsandbytes' kernels index ({MAX_NUMEL:,d}) with bnb_4bit_blocksize="
                          f"{config.bnb_4bit_blocksize}; add it to llm_int8_skip_modules.")
    if not weight.dtype.is_floating_point:
        raise ConfigError(f"layer {key!r}: weight dtype {weight.dtype} is not a float; it is already quantized?")


def quantize_model(gm: fx.GraphModule, model: torch.nn.Module, config: Any,
                   keep: tuple[str, ...] = ()) -> tuple[QuantStore, QuantReport]:
    """Pack the weight of every `aten.linear` in `gm` (a capture of `model`) but the output head, the skip
    list and `keep` (module paths), and hollow the full-precision parameters in place.

    The parameters keep their identity (`.data` is swapped), so captures made earlier still read them,
    and the quant store finds them by identity. GPT-2 Conv1D (`addmm`) weights are left alone.
    """
    require_bitsandbytes()
    config = as_quant_config(config)
    head = output_head_path(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    uses = Counter(id(p) for p in params.values())
    store, skipped, planned = QuantStore(config), [], {}
    for site in linear_sites(gm, model):
        if site.fan_in_fan_out or site.weight_path in planned:
            continue
        weight = params[site.weight_path]
        if (site.key == head or config.skips(site.key) or uses[id(weight)] > 1
                or any(site.key == k or site.key.startswith(f"{k}.") for k in keep)):
            skipped.append(site.key)
            continue
        check_quantizable(site.key, weight, config)
        planned[site.weight_path] = weight
    if not planned:
        raise TargetNotFoundError(f"no linear of {type(model).__name__} is left to quantize (output head and "
                                  f"llm_int8_skip_modules={config.llm_int8_skip_modules} excluded: {skipped}).")
    kind = Weight4bit if config.load_in_4bit else Weight8bit
    before = 0
    for path, weight in planned.items():
        before += storage_bytes([weight])
        packed = kind.quantize(weight, config)
        with torch.no_grad():
            weight.data = hollow(weight)
        weight.requires_grad_(False)
        store.add(path, weight, packed)
    store.bytes_before = before
    return store, QuantReport(config.bits, len(planned), before, store.nbytes(), tuple(dict.fromkeys(skipped)))


def dequantize_into_model(model: torch.nn.Module, store: QuantStore) -> None:
    """Give every hollow parameter its full-precision weight back (dequantized), emptying the store."""
    params = {path: p for path, p in model.named_parameters(remove_duplicate=False)}
    for path, packed in list(store.items()):
        with torch.no_grad():
            params[path].data = packed.dequantize(packed.dtype)
        store.remove(path)


def warn_requantize(what: str) -> None:
    warnings.warn(f"{what} a quantized base: each weight is dequantized, changed and quantized again, so rounding "
                  "changes outputs slightly (merge_and_unload(dequantize=True) merges in full precision).",
                  stacklevel=3)
