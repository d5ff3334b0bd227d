"""Capture: turn an nn.Module into exported FX graphs, one per call signature and train/eval mode.

A signature is the set of keyword inputs with their dtypes and ranks (plus constant arguments). Each
capture records, per input dimension, either its static size or the range torch.export proved, and a
call is served by a capture only when its sizes fit; otherwise a new capture is made. This replaces
torch.export's runtime guards (we unlift with check_guards=False) by a check peftfx owns.

The model is captured in the mode it will run in (train or eval), because transformers code takes
Python branches on `self.training` (dropout probabilities inside attention, for example) that are baked
into the graph at capture time.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import CaptureError

# Inputs of transformers models whose dimension 1 is the sequence length.
SEQUENCE_INPUTS = {
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "labels", "inputs_embeds",
    "decoder_input_ids", "decoder_attention_mask",
}
MIN_EXAMPLE_SIZE = 2  # export specialises sizes 0 and 1, so examples are grown to at least 2
MAX_BATCH = 1 << 16


@dataclass(frozen=True)
class Signature:
    """What a graph depends on besides tensor sizes: input names, dtypes, ranks, constants, mode."""

    inputs: tuple
    training: bool

    @staticmethod
    def of(kwargs: dict[str, Any], training: bool) -> "Signature":
        parts = []
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                parts.append((name, "tensor", str(value.dtype), value.dim(), str(value.device)))
            else:
                parts.append((name, "const", repr(value)))
        return Signature(tuple(sorted(parts)), training)


@dataclass
class Capture:
    """One exported program plus the sizes it is valid for."""

    signature: Signature
    program: torch.export.ExportedProgram
    dim_ranges: dict[str, tuple] = field(default_factory=dict)  # name -> per dim: int or (lo, hi)
    # passes/fuse.py trades kernels for a concatenation and views. Run eagerly, a decode graph (one token
    # per row) pays per op, so its eager variants are built unfused (measured: fused up to 6% slower);
    # compiled, the views cost nothing and fused decoding measured 0-5% faster.
    fuse_eager: bool = True

    def accepts(self, kwargs: dict[str, Any]) -> bool:
        for name, ranges in self.dim_ranges.items():
            shape = kwargs[name].shape
            for size, allowed in zip(shape, ranges):
                if isinstance(allowed, int):
                    if size != allowed:
                        return False
                elif not allowed[0] <= size <= allowed[1]:
                    return False
        return True

    def fresh_module(self) -> torch.fx.GraphModule:
        """A new GraphModule over the same parameter tensors (passes mutate it freely).

        Input checks are off: `accepts` already checked the sizes before this capture was chosen,
        and export's own per-call check re-evaluates sympy guards (a third of a tiny model's call).
        """
        gm = self.program.module(check_guards=False)
        gm.validate_inputs = False
        return gm


def normalize_call(forward_signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind positional and keyword arguments to names, dropping Nones (the model's own default)."""
    try:
        bound = forward_signature.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"arguments do not fit the model's forward{forward_signature}: {exc}") from None
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = forward_signature.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update({k: v for k, v in value.items() if v is not None})
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("peftfx cannot capture *args of a model's forward; pass inputs by name.")
        elif value is not None:
            out[name] = value
    return out


class Capturer:
    """Owns the captures of one model and hands out the one that fits a call."""

    def __init__(self, model: torch.nn.Module, dynamic_axes: Optional[dict[str, dict[int, str]]] = None):
        self.model = model
        self.forward_signature = inspect.signature(model.forward)
        self.is_hf = hasattr(model, "config") and hasattr(model.config, "model_type")
        self.user_dynamic_axes = dynamic_axes
        self.captures: dict[Signature, list[Capture]] = {}

    def clear(self) -> None:
        self.captures.clear()

    def prepare_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Name the inputs; HF models get use_cache=False (the forward graph has no KV cache)."""
        named = normalize_call(self.forward_signature, args, kwargs)
        for name, value in named.items():
            if not isinstance(value, (torch.Tensor, bool, int, float, str)):
                raise TypeError(
                    f"input {name!r} is a {type(value).__name__}; peftfx captures tensors and plain "
                    "constants only (KV caches come with generate()).")
        if self.is_hf and "use_cache" in self.forward_signature.parameters:
            if named.get("use_cache"):
                raise ValueError("use_cache=True is not supported: peftfx captures the forward graph without a KV "
                                 "cache; drop use_cache (decoding with a cache is not implemented yet).")
            named["use_cache"] = False
        return named

    def get(self, kwargs: dict[str, Any], training: bool) -> Capture:
        signature = Signature.of(kwargs, training)
        for capture in self.captures.get(signature, []):
            if capture.accepts(kwargs):
                return capture
        capture = self._capture(signature, kwargs, training)
        self.captures.setdefault(signature, []).append(capture)
        return capture

    # -- internals -------------------------------------------------------------------------------

    def _axes_for(self, name: str, value: torch.Tensor) -> dict[int, str]:
        if self.user_dynamic_axes is not None:
            return dict(self.user_dynamic_axes.get(name, {}))
        axes = {0: "batch"} if value.dim() >= 1 else {}
        if self.is_hf and name in SEQUENCE_INPUTS and value.dim() >= 2:
            axes[1] = "seq"
        return axes

    def _max_seq(self) -> int:
        config = getattr(self.model, "config", None)
        for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 1:
                return value
        return MAX_BATCH

    def _capture(self, signature: Signature, kwargs: dict[str, Any], training: bool) -> Capture:
        axes = {n: self._axes_for(n, v) for n, v in kwargs.items() if isinstance(v, torch.Tensor)}
        # Clones: export merges inputs that alias one tensor (labels=input_ids), which would bake the alias in.
        example = {n: _grow(v, axes.get(n, {})).clone() if isinstance(v, torch.Tensor) else v
                   for n, v in kwargs.items()}
        with module_mode(self.model, training):
            program = export_dynamic(self.model, example, axes, self._max_seq())
        return Capture(signature, program, _dim_ranges(program, example))


def export_dynamic(module: torch.nn.Module, example: dict[str, Any], axes: dict[str, dict[int, str]],
                   max_seq: int) -> torch.export.ExportedProgram:
    """torch.export (non-strict) with the named dims `axes` ("batch", "seq", ...) dynamic.

    Named Dims first; if export rejects them (a model bounds or guards a size, as BERT does its sequence
    length), once more with Dim.AUTO on the same axes, which adopts the bounds the model proves."""
    dims = {"batch": Dim("batch", min=1, max=MAX_BATCH), "seq": Dim("seq", min=1, max=max_seq)}
    named_dims = {n: ({a: dims.get(d) or Dim(d) for a, d in axes[n].items()} if n in axes else None)
                  for n in example}
    auto_dims = {n: ({a: Dim.AUTO for a in ax} if ax is not None else None) for n, ax in named_dims.items()}
    errors = []
    for dynamic_shapes in (named_dims, auto_dims):
        try:
            with _keyword_forward(module, list(example)):
                return torch.export.export(module, (), example, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # torch raises many types; we retry once with AUTO dims
            errors.append(exc)
    raise CaptureError(
        f"torch.export could not capture {type(module).__name__} with inputs {sorted(example)}: "
        f"{errors[-1]}") from errors[-1]


def _grow(value: torch.Tensor, axes: dict[int, str]) -> torch.Tensor:
    """Tile dynamic dims smaller than 2 so export does not specialise them (values stay valid)."""
    for axis in axes:
        if value.shape[axis] < MIN_EXAMPLE_SIZE:
            if value.shape[axis] == 0:
                raise CaptureError(f"cannot capture from an input with an empty dimension {axis}.")
            repeats = [1] * value.dim()
            repeats[axis] = MIN_EXAMPLE_SIZE
            value = value.repeat(*repeats)
    return value


def _dim_ranges(program: torch.export.ExportedProgram, example: dict[str, Any]) -> dict[str, tuple]:
    """Per tensor input: each dim's static size, or the (lo, hi) range export proved for it."""
    leaves, _ = pytree.tree_flatten(((), example))
    leaf_names = _leaf_names(example)
    user_inputs = program.graph_signature.user_inputs
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    ranges: dict[str, tuple] = {}
    for leaf_name, leaf, ph_name in zip(leaf_names, leaves, user_inputs):
        if not isinstance(leaf, torch.Tensor):
            continue
        val = placeholders[ph_name].meta.get("val")
        dims = []
        for size in val.shape:
            if isinstance(size, int):
                dims.append(size)
            else:
                vr = program.range_constraints.get(size.node.expr)
                lo = int(vr.lower) if vr is not None else 1
                hi = int(vr.upper) if vr is not None and vr.upper.is_finite else MAX_BATCH * MAX_BATCH
                dims.append((lo, hi))
        ranges[leaf_name] = tuple(dims)
    return ranges


def _leaf_names(example: dict[str, Any]) -> list[str]:
    """Input names in pytree leaf order (kwargs dicts flatten in insertion order)."""
    names = []
    for name, value in example.items():
        count = len(pytree.tree_leaves(value))
        names.extend([name] * count)
    return names


@contextlib.contextmanager
def _keyword_forward(model: torch.nn.Module, names: list[str]):
    """Export the model through a forward whose signature names exactly these keyword inputs.

    torch.export cannot take dynamic shapes for inputs that land in a forward's **kwargs (transformers'
    Trainer passes num_items_in_batch that way); a keyword-only signature sidesteps it.
    """
    original = model.__dict__.get("forward")
    bound = model.forward

    def forward(**kwargs):
        return bound(**kwargs)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names])
    model.forward = forward
    try:
        yield
    finally:
        if original is None:
            del model.forward
        else:
            model.forward = original


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, training: bool):
    """Run the block with `model` in train (True) or eval (False) mode, then restore its mode:
    capturing must not change the user's model."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)
