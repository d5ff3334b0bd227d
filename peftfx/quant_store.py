"""The quant store: quantized base weights as plain buffers (packed data + quantization state).

bitsandbytes keeps a quantized weight in a tensor subclass (`Params4bit`, `Int8Params`) that
torch.export cannot trace. peftfx keeps the same bytes as ordinary buffers instead, in an nn.Module tree
mirroring the model's parameter paths (`<weight path>.packed`, `.absmax`, ...); every variant graph
mounts the store and reads them with get_attr, and `passes/quantize.py` feeds them to bitsandbytes'
registered ops (`torch.ops.bitsandbytes.*`), which export and compile.

The model keeps a *hollow* parameter where the full-precision weight was: a stride-0 NaN tensor of the
original shape and dtype (a few bytes). Selection, LoRA planning and checkpoint shapes see the usual
(out, in) weight; the quantize pass replaces every graph read of it, and running the model eagerly
without peftfx gives NaN rather than silently wrong numbers.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Union, cast

import torch
from torch import nn

from .quant_config import QuantConfig, require_bitsandbytes
from .rewrite.layout import QUANT_MOUNT  # noqa: F401 - where variant graphs mount the store

NESTED_BLOCKSIZE = 256  # bitsandbytes double-quantizes absmax in blocks of 256


def hollow(like: torch.Tensor) -> torch.Tensor:
    """A stride-0 NaN stand-in with `like`'s shape, dtype and device (one element of memory)."""
    return torch.full((), math.nan, dtype=like.dtype, device=like.device).expand(like.shape)


def is_hollow(t: torch.Tensor) -> bool:
    return t.dim() > 0 and all(s == 0 for s in t.stride()) and t.numel() > 1


def storage_bytes(tensors) -> int:
    """Bytes actually held by distinct storages (hollow and shared tensors counted once)."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class Weight4bit(nn.Module):
    """A (out, in) weight in bitsandbytes 4-bit form (NF4 or FP4, optionally double-quantized).

    Buffers: `packed` (uint8, two codes per byte), `absmax` (float32 per block; uint8 when nested),
    and with double quantization `nested_absmax`, `nested_code`, `offset` (bitsandbytes' state2).
    """

    bits = 4
    # the buffers __init__ registers, declared for type checkers
    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor
    nested_code: torch.Tensor
    offset: torch.Tensor

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        blocksize: int,
        quant_type: str,
        compute_dtype: Optional[torch.dtype],
        buffers: dict[str, torch.Tensor],
    ):
        super().__init__()
        self.shape, self.dtype, self.blocksize, self.quant_type = tuple(shape), dtype, blocksize, quant_type
        self.compute_dtype = compute_dtype
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)

    @property
    def nested(self) -> bool:
        return "nested_absmax" in self._buffers

    @classmethod
    def quantize(cls, weight: torch.Tensor, config: QuantConfig) -> "Weight4bit":
        """bitsandbytes' own quantize_4bit (what Params4bit does), so the bytes equal bnb's."""
        functional = require_bitsandbytes().functional
        packed, state = functional.quantize_4bit(
            weight.detach().contiguous(),
            blocksize=config.bnb_4bit_blocksize,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=torch.uint8,
        )
        compute_dtype = cast(Optional[torch.dtype], config.bnb_4bit_compute_dtype)  # a dtype after __post_init__
        return cls.from_state(packed, state, compute_dtype)

    @classmethod
    def from_state(cls, packed: torch.Tensor, state, compute_dtype: Optional[torch.dtype]) -> "Weight4bit":
        """From bitsandbytes' packed data and QuantState, sharing their tensors (no copy)."""
        buffers = {"packed": packed.view(torch.uint8), "absmax": state.absmax}
        if state.nested:
            if state.state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(
                    f"double quantization with state2 blocksize {state.state2.blocksize} is not "
                    f"supported (bitsandbytes uses {NESTED_BLOCKSIZE})."
                )
            buffers.update(
                nested_absmax=state.state2.absmax,
                nested_code=state.state2.code,
                offset=torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device),
            )
        return cls(tuple(state.shape), state.dtype, state.blocksize, state.quant_type, compute_dtype, buffers)

    def float_absmax(self) -> torch.Tensor:
        if not self.nested:
            return self.absmax
        ops = torch.ops.bitsandbytes
        return (
            ops.dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code, NESTED_BLOCKSIZE, torch.float32)
            + self.offset
        )

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        require_bitsandbytes()
        return torch.ops.bitsandbytes.dequantize_4bit(
            self.packed, self.float_absmax(), self.blocksize, self.quant_type, list(self.shape), dtype or self.dtype
        )

    def requantized(self, weight: torch.Tensor) -> "Weight4bit":
        """The same format holding another weight (for merges)."""
        config = QuantConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.nested,
            bnb_4bit_blocksize=self.blocksize,
            bnb_4bit_compute_dtype=self.compute_dtype,
        )
        return Weight4bit.quantize(weight.to(self.dtype), config)


class Weight8bit(nn.Module):
    """A (out, in) weight in LLM.int8 form: `CB` int8 rows and `SCB` their float32 absmax (row scales)."""

    bits = 8
    # the buffers __init__ registers, declared for type checkers
    CB: torch.Tensor
    SCB: torch.Tensor

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, threshold: float, cb: torch.Tensor, scb: torch.Tensor
    ):
        super().__init__()
        self.shape, self.dtype, self.threshold = tuple(shape), dtype, float(threshold)
        self.register_buffer("CB", cb)
        self.register_buffer("SCB", scb)

    @classmethod
    def quantize(cls, weight: torch.Tensor, config: QuantConfig) -> "Weight8bit":
        """bitsandbytes' row-wise int8 quantization of the fp16 weight (what Int8Params does)."""
        functional = require_bitsandbytes().functional
        cb, scb, _ = functional.int8_vectorwise_quant(weight.detach().contiguous().to(torch.float16))
        return cls(tuple(weight.shape), weight.dtype, config.llm_int8_threshold, cb, scb)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """bitsandbytes' own dequantization of the int8 weight (MatMul8bitFp's formula)."""
        dtype = dtype or self.dtype
        return self.CB.to(dtype) * (self.SCB.unsqueeze(1) * (1.0 / 127.0)).to(dtype)

    def requantized(self, weight: torch.Tensor) -> "Weight8bit":
        config = QuantConfig(load_in_8bit=True, llm_int8_threshold=self.threshold)
        return Weight8bit.quantize(weight.to(self.dtype), config)


QuantizedWeight = (Weight4bit, Weight8bit)
AnyQuantizedWeight = Union[Weight4bit, Weight8bit]


class QuantStore(nn.Module):
    """Quantized weights by the model's weight path, plus which hollow parameter each one replaces."""

    def __init__(self, config: Optional[QuantConfig] = None) -> None:
        super().__init__()
        self.config = config
        self.paths: dict[int, str] = {}  # id(hollow parameter) -> weight path
        self.bytes_before = 0  # full-precision bytes of the weights now stored here

    @staticmethod
    def module_path(weight_path: str) -> str:
        return weight_path.replace(".", "_")  # one flat level: get_attr targets stay short and unambiguous

    def add(self, weight_path: str, parameter: torch.Tensor, quantized: nn.Module) -> None:
        self.add_module(self.module_path(weight_path), quantized)
        self.paths[id(parameter)] = weight_path

    def get(self, weight_path: str) -> AnyQuantizedWeight:
        return cast(AnyQuantizedWeight, self._modules[self.module_path(weight_path)])

    def holds(self, weight_path: str) -> bool:
        """Whether the weight at this path is stored here (quantized)."""
        return self.module_path(weight_path) in self._modules

    def path_of(self, parameter: torch.Tensor) -> Optional[str]:
        return self.paths.get(id(parameter))

    def replace(self, weight_path: str, quantized: nn.Module) -> None:
        """Swap in a requantized weight in place (the graphs read buffers by name, so they follow)."""
        current = self.get(weight_path)
        for name, tensor in quantized.named_buffers():
            current._buffers[name] = tensor

    def remove(self, weight_path: str) -> None:
        del self._modules[self.module_path(weight_path)]
        self.paths = {k: v for k, v in self.paths.items() if v != weight_path}

    def items(self) -> Iterator[tuple[str, AnyQuantizedWeight]]:
        for path in list(self.paths.values()):
            yield path, self.get(path)

    def nbytes(self) -> int:
        return storage_bytes(list(self.buffers()))
