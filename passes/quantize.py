"""Quantize: run the targeted base linears on bitsandbytes 4-bit or 8-bit weights.

Two halves, like merge: `quantize_model` (peftfx/quantize_weights.py) changes weights once (packs each
targeted weight with bitsandbytes into the quant store and hollows the full-precision parameter), and the
rules rewrite every variant graph to read the packed weight instead, through bitsandbytes' registered ops, which export
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
from typing import Any, Optional

import torch
from torch import fx

from peftfx.errors import ConfigError
from peftfx.rewrite import ANY, ATTR, MOUNT, QUANT_MOUNT, Builder, Captures, P, Pass, PassContext, Rule, read_tensor

aten = torch.ops.aten
NAME = "quantize"
NESTED_BLOCKSIZE = 256  # bitsandbytes double-quantizes absmax in blocks of 256 (the quant store refuses others)
_COPY = ".modules_to_save."  # what a modules_to_save copy's store path holds (passes/modules_to_save.py)


def _packed(bits: int):
    """A weight read whose tensor the quant store holds `bits`-bit; captures its path and packed weight."""

    def where(node: fx.Node, ctx: PassContext):
        weight = read_tensor(node)
        path = ctx.quant.path_of(weight) if weight is not None else None
        if path is None or ctx.quant.get(path).bits != bits:
            return None
        return {"path": path, "packed": ctx.quant.get(path)}

    return where


def _quantized_linear(bits: int) -> P:
    return P(aten.linear.default, ANY("x"), ATTR("weight", where=_packed(bits)))


def _copied_module(node: fx.Node) -> Optional[str]:
    """The module whose modules_to_save copy's weight this get_attr reads, if it reads one."""
    target = str(node.target)
    if node.op != "get_attr" or not target.startswith(f"{MOUNT}.") or _COPY not in target:
        return None
    if not target.endswith(".weight"):
        return None
    return target[len(MOUNT) + 1 :].split(_COPY)[0]


def _validate(gm: fx.GraphModule, ctx: PassContext) -> None:
    """A modules_to_save copy of a quantized module would copy the hollow weight: refuse it."""
    for node in gm.graph.nodes:
        module = _copied_module(node)
        if module is not None and ctx.quant.holds(f"{module}.weight"):
            skip = module.rsplit(".", 1)[-1]
            raise ConfigError(
                f"module {module!r} is quantized, so modules_to_save cannot train a copy of it; keep it "
                f"in full precision with QuantConfig(llm_int8_skip_modules=[{skip!r}])."
            )


Inputs = tuple[Any, str, fx.Node, Optional[fx.Node], torch.dtype, Optional[torch.dtype]]


def _inputs(ctx: PassContext, m: Captures) -> Inputs:
    """(packed weight, get_attr prefix of its buffers, x, bias, x's dtype, bias's dtype) of a matched linear."""
    node, weight, x = m["node"], m["packed"], m["x"]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    x_dtype = x.meta["val"].dtype if "val" in x.meta else weight.dtype
    bias_tensor = read_tensor(bias)
    return (
        weight,
        f"{QUANT_MOUNT}.{ctx.quant.module_path(m['path'])}",
        x,
        bias,
        x_dtype,
        bias_tensor.dtype if bias_tensor is not None else None,
    )


def _linear_4bit(b: Builder, ctx: PassContext, m: Captures) -> None:
    weight, prefix, x, bias, x_dtype, bias_dtype = _inputs(ctx, m)
    ops = torch.ops.bitsandbytes
    absmax = b.get_attr(f"{prefix}.absmax")
    if weight.nested:
        absmax = b.call(
            ops.dequantize_blockwise.default,
            absmax,
            b.get_attr(f"{prefix}.nested_absmax"),
            b.get_attr(f"{prefix}.nested_code"),
            NESTED_BLOCKSIZE,
            torch.float32,
        )
        absmax = b.call(aten.add.Tensor, absmax, b.get_attr(f"{prefix}.offset"))
    compute = weight.compute_dtype or x_dtype
    w = b.call(
        ops.dequantize_4bit.default,
        b.get_attr(f"{prefix}.packed"),
        absmax,
        weight.blocksize,
        weight.quant_type,
        list(weight.shape),
        compute,
    )
    if x_dtype != compute:
        x = b.call(aten.to.dtype, x, compute)
    if bias is not None and bias_dtype != compute:
        bias = b.call(aten.to.dtype, bias, compute)
    y = b.call(aten.linear.default, x, w, bias)
    if x_dtype != compute:
        y = b.call(aten.to.dtype, y, x_dtype)
    b.replace_uses(m["node"], y)


def _linear_8bit(b: Builder, ctx: PassContext, m: Captures) -> None:
    weight, prefix, x, bias, x_dtype, bias_dtype = _inputs(ctx, m)
    node = m["node"]
    ops = torch.ops.bitsandbytes
    if bias is not None and bias_dtype != x_dtype:
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


PASS = Pass(
    NAME,
    rules=(
        Rule("linear4bit", _quantized_linear(4), _linear_4bit),
        Rule("linear8bit", _quantized_linear(8), _linear_8bit),
    ),
    applies=lambda ctx: ctx.quant is not None,
    validate=_validate,
)
