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
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import sympy
import torch
from torch.export import Dim
from torch.utils import _pytree as pytree
from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

from .errors import CaptureError, ConfigError
from .progress import get_logger, timed
from .sharding import unsharded_placeholders

# Inputs of transformers models whose dimension 1 is the sequence length.
SEQUENCE_INPUTS = {
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "labels",
    "inputs_embeds",
    "decoder_input_ids",
    "decoder_attention_mask",
}
MIN_EXAMPLE_SIZE = 2  # export specialises sizes 0 and 1, so examples are grown to at least 2
MAX_BATCH = 1 << 16
FULL, BACKBONE = "model", "backbone"  # what a capture runs: the whole model, or its backbone (no head)
OWNERS_META = "peftfx_owners"  # GraphModule.meta key of a fresh module's Capture.owners
# Capturing by layer exports twice (the top graph, then a layer) and runs a layer's fake forward twice
# more, so it pays from about 4 layers up. Apply + first eval call + first train step of a tiny Llama,
# one thread, by layer against whole: 3.7 / 3.2 s at 2 layers, 3.1 / 4.7 s at 4, 7.7 / 24.3 s at 32.
LAYERED_MIN_LAYERS = 4
UNBOUNDED = sys.maxsize  # the upper end of a dim range export left open (±oo)
log = get_logger("capture")


@dataclass(frozen=True)
class Signature:
    """What a graph depends on besides tensor sizes: input names, dtypes, ranks, constants, mode."""

    inputs: tuple
    training: bool
    part: str = "model"  # FULL or BACKBONE
    # Autocast as the call found it: export bakes its casts into the graph (and checks intermediate
    # dtypes), so a graph captured with autocast on must not serve a call with it off, and the reverse.
    autocast: tuple = ()

    @staticmethod
    def of(kwargs: dict[str, Any], training: bool, part: str = "model") -> "Signature":
        parts: list[tuple[Any, ...]] = []
        devices = set()
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                parts.append((name, "tensor", str(value.dtype), value.dim(), str(value.device)))
                devices.add(value.device.type)
            else:
                parts.append((name, "const", repr(value)))
        return Signature(tuple(sorted(parts)), training, part, autocast_state(devices | {"cpu"}))


def autocast_state(device_types: Any) -> tuple:
    """(device type, dtype) of each device type with autocast on, sorted (empty when it is off)."""
    return tuple(
        (device, str(torch.get_autocast_dtype(device)))
        for device in sorted(device_types)
        if torch.is_autocast_enabled(device)
    )


@dataclass
class Capture:
    """One exported program plus the sizes it is valid for."""

    signature: Signature
    program: torch.export.ExportedProgram
    dim_ranges: dict[str, tuple] = field(default_factory=dict)  # name -> per dim: int or (lo, hi)
    # name -> per dim: the symbol export gave it (None when static). Dims sharing a symbol must be equal in
    # a call: a graph whose position_ids batch is tied to the input_ids batch cannot take [1, S] with [B, S].
    dim_symbols: dict[str, tuple] = field(default_factory=dict)
    # passes/fuse.py trades kernels for a concatenation and views. Run eagerly, a decode graph (one token
    # per row) pays per op, so its eager variants are built unfused (measured: fused up to 6% slower);
    # compiled, the views cost nothing and fused decoding measured 0-5% faster.
    fuse_eager: bool = True
    # get_attr target -> (dictionary of the user's module holding that tensor when captured, its key): the
    # graphs read there at call time (peftfx/bindings.py), so a parameter swapped in later (FSDP2) is seen.
    owners: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    blocks: bool = True  # run as a top graph over block calls (peftfx/blocks.py); decode graphs are not

    @property
    def layer_graphs(self) -> int:
        """How many layers were exported on their own (peftfx/layer_capture.py); 0: the whole model was."""
        return 0

    def accepts(self, kwargs: dict[str, Any]) -> bool:
        tied: dict[str, int] = {}
        for name, ranges in self.dim_ranges.items():
            shape = kwargs[name].shape
            symbols = self.dim_symbols.get(name, (None,) * len(ranges))
            for size, allowed, symbol in zip(shape, ranges, symbols):
                if isinstance(allowed, int):
                    if size != allowed:
                        return False
                elif not allowed[0] <= size <= allowed[1]:
                    return False
                if symbol is not None and tied.setdefault(symbol, size) != size:
                    return False
        return True

    def fresh_module(self) -> torch.fx.GraphModule:
        """A new GraphModule over the same parameter tensors (passes mutate it freely).

        Input checks are off: `accepts` already checked the sizes before this capture was chosen,
        and export's own per-call check re-evaluates sympy guards (a third of a tiny model's call).
        """
        gm = self.program.module(check_guards=False)
        gm.validate_inputs = False  # type: ignore[assignment]  # export's own flag, not declared on GraphModule
        gm.meta[OWNERS_META] = self.owners  # selection matches graph tensors to the model's through them
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
        self.layered = True  # capture by layer where the model has repeated layers (peftfx/layer_capture.py)

    def clear(self) -> None:
        self.captures.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Copies (copy.deepcopy, pickle) capture again on first use: an exported program holds the
        original model's tensors."""
        return {**self.__dict__, "captures": {}}

    def all(self) -> list[Capture]:
        """Every capture made (forward and decode), oldest first per signature."""
        return [c for captures in self.captures.values() for c in captures]

    def find(self, signature: Signature) -> Optional[Capture]:
        """The first capture of a signature (for graphs keyed by signature alone, as decode graphs)."""
        found = self.captures.get(signature)
        return found[0] if found else None

    def add(self, capture: Capture) -> None:
        """Keep a capture made elsewhere (a decode graph), so `.to()` and quantization drop it like the rest."""
        self.captures.setdefault(capture.signature, []).append(capture)

    def prepare_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Name the inputs; HF models get use_cache=False (the forward graph has no KV cache)."""
        named = normalize_call(self.forward_signature, args, kwargs)
        for name, value in named.items():
            if not isinstance(value, (torch.Tensor, bool, int, float, str)):
                raise TypeError(
                    f"input {name!r} is a {type(value).__name__}; peftfx captures tensors and plain "
                    "constants only (KV caches come with generate())."
                )
        if self.is_hf and "use_cache" in self.forward_signature.parameters:
            if named.get("use_cache"):
                raise ValueError(
                    "use_cache=True is not supported: peftfx captures the forward graph without a KV "
                    "cache; drop use_cache (decoding with a cache is not implemented yet)."
                )
            named["use_cache"] = False
        if self.is_hf:
            check_sequence_shapes(named, not getattr(self.model.config, "is_encoder_decoder", False))
            _fill_attention_mask(named, self.forward_signature)
        return named

    def get(self, kwargs: dict[str, Any], training: bool, part: str = FULL) -> Capture:
        """The capture serving a call of the whole model (FULL) or of its backbone (BACKBONE)."""
        signature = Signature.of(kwargs, training, part)
        for capture in self.captures.get(signature, []):
            if capture.accepts(kwargs):
                return capture
        capture = self._capture(signature, kwargs, training, part)
        self.captures.setdefault(signature, []).append(capture)
        return capture

    def axes_for(self, name: str, value: torch.Tensor, batch: Optional[int] = None) -> dict[int, str]:
        """The dynamic dims of one input. `batch`, the call's batch size: an input whose dim 0 is 1 in a
        larger batch is broadcast over it (HF takes position_ids [1, S] with input_ids [B, S]), so that dim
        stays a static 1 instead of being tied to the batch."""
        if self.user_dynamic_axes is not None:
            return dict(self.user_dynamic_axes.get(name, {}))
        axes = {0: "batch"} if value.dim() >= 1 else {}
        if value.dim() >= 1 and value.shape[0] == 1 and (batch or 1) > 1:
            axes = {}
        if self.is_hf and name in SEQUENCE_INPUTS and value.dim() >= 2:
            axes.update(dict.fromkeys(_sequence_axes(name, value), "seq"))
        return axes

    def max_seq(self) -> int:
        """The longest sequence the model's config allows (its position table), else MAX_BATCH."""
        config = getattr(self.model, "config", None)
        for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 1:
                return value
        return MAX_BATCH

    @torch.compiler.disable
    def _capture(self, signature: Signature, kwargs: dict[str, Any], training: bool, part: str = FULL) -> Capture:
        """Export a new graph. Never traced by dynamo: a call through torch.compile(pm) (or Trainer's
        torch_compile) reaching here runs export eagerly, as outside dynamo, so the named Dims and their
        bounds hold (traced by dynamo, export fails on them and the AUTO retry proves only [2, oo])."""
        batch = call_batch(kwargs)
        axes = {n: self.axes_for(n, v, batch) for n, v in kwargs.items() if isinstance(v, torch.Tensor)}
        # Clones: export merges inputs that alias one tensor (labels=input_ids), which would bake the alias in.
        example = {
            n: _grow(v, axes.get(n, {})).clone() if isinstance(v, torch.Tensor) else v for n, v in kwargs.items()
        }
        max_seq = self.max_seq()
        lengths = [
            v.shape[a]
            for n, v in example.items()
            if isinstance(v, torch.Tensor)
            for a, d in axes.get(n, {}).items()
            if d == "seq"
        ]
        if lengths and max(lengths) > max_seq:
            # The model runs sequences past its position table (rotary positions do): this capture serves
            # every longer length, so the next long call reuses it instead of capturing again.
            max_seq = MAX_BATCH
        root = self.model if part == FULL else Backbone(self.model)
        inputs = ", ".join(n for n, v in kwargs.items() if isinstance(v, torch.Tensor))
        mode = "train" if training else "eval"
        what = f"capturing {type(self.model).__name__}{'' if part == FULL else ' (' + part + ')'} with torch.export"
        with (
            module_mode(self.model, training),
            without_checkpointing(self.model),
            unsharded_placeholders(self.model),
            timed(log, f"{what} ({mode}; inputs {inputs})"),
        ):
            layered = self._layered(root, example, axes, max_seq)
            if layered is None:
                program = export_dynamic(root, example, axes, max_seq)
                owners = module_owners(program, root)  # while the placeholders stand where the shards are
        if layered is not None:
            program, extra, owners = layered
        if root is not self.model:
            strip_wrapper(program, Backbone.PREFIX)
        ranges, symbols = _dim_ranges(program, example)
        if layered is not None:
            from .layer_capture import LayeredCapture

            return LayeredCapture(signature, program, ranges, symbols, owners=owners, **extra)
        return Capture(signature, program, ranges, symbols, owners=owners)

    def _layered(self, root: torch.nn.Module, example: dict, axes: dict, max_seq: int) -> Optional[tuple]:
        """A capture by layer (peftfx/layer_capture.py) where the model has repeated layers, or None
        (then the whole model is exported): its cost does not grow with depth."""
        if not self.layered:
            return None
        from .blocks import block_paths
        from .layer_capture import layered_capture

        _, paths = block_paths(self.model)
        if len(paths) < LAYERED_MIN_LAYERS:
            return None
        prefix = "" if root is self.model else Backbone.PREFIX + "."
        try:
            return layered_capture(
                root, self.model, paths, prefix, lambda: export_dynamic(root, example, axes, max_seq)
            )
        except Exception as exc:  # any failure: the whole model is exported instead, as before
            log.debug("capture by layer failed (%s: %s); exporting the whole model", type(exc).__name__, exc)
            return None


def module_owners(
    program: torch.export.ExportedProgram, root: torch.nn.Module
) -> dict[str, tuple[dict[str, Any], str]]:
    """Where each parameter and buffer of the capture lives in the exported module: the dictionary
    (`_parameters` or `_buffers`) of the module at its path that holds that very tensor now. A tensor
    the capture holds in its own right (bitsandbytes' adopted buffers, lifted constants) has none."""
    owners: dict[str, tuple[dict[str, Any], str]] = {}
    modules = dict(root.named_modules(remove_duplicate=False))
    for fqn, value in [*program.state_dict.items(), *program.constants.items()]:
        path, _, name = fqn.rpartition(".")
        module = modules.get(path)
        if module is None:
            continue
        for found in (module._parameters, module._buffers):
            if found.get(name) is value:
                owners[fqn] = (found, name)
                break
    return owners


class Backbone(torch.nn.Module):
    """The model without its head (transformers' `base_model`: LlamaModel in LlamaForCausalLM), as a
    module holding the whole model, so the exported graph's module paths are the model's own once
    `strip_wrapper` drops PREFIX: the passes find the same sites as in the full graph."""

    PREFIX = "model"

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **kwargs: Any) -> Any:
        backbone: Any = self.model.base_model  # a transformers PreTrainedModel's model without its head
        return backbone(**kwargs)


def strip_wrapper(program: torch.export.ExportedProgram, prefix: str) -> None:
    """Module paths of a wrapper's capture as the wrapped model names them (`model.layers.0...`, not
    `model.model.layers.0...`)."""
    dotted = prefix + "."
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: ((path[len(dotted) :] if path.startswith(dotted) else "" if path == prefix else path), kind)
                for key, (path, kind) in stack.items()
            }


def _fill_attention_mask(named: dict[str, Any], forward_signature: inspect.Signature) -> None:
    """A call without attention_mask gets one of ones, which is what transformers assumes for a missing
    mask: calls with and without a mask then share one capture (each would be a graph of its own)."""
    if "attention_mask" in named or "attention_mask" not in forward_signature.parameters:
        return
    tokens = named.get("input_ids")
    if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
        named["attention_mask"] = torch.ones_like(tokens)
        return
    embeds = named.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        named["attention_mask"] = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)


# Inputs HF broadcasts over the batch when their dim 0 is 1.
BROADCAST_INPUTS = {"position_ids", "token_type_ids"}


def check_sequence_shapes(named: dict[str, Any], labels_follow_tokens: bool = True) -> None:
    """Refuse token inputs whose batch or sequence sizes disagree with input_ids (or inputs_embeds), naming
    them, before anything is captured or run: export would fail, or a graph captured for other sizes would
    fail deep inside with a reshape error. Decoder inputs of encoder-decoder models are not checked.

    Allowed: dim 0 of 1 for BROADCAST_INPUTS; 4-D attention masks [B or 1, heads, S, S]; labels [B] or
    float labels [B, n] (classification). `labels_follow_tokens`: integer labels of rank 2 or more have
    the token length (False for encoder-decoder models, whose labels are decoder tokens)."""
    shapes = {n: tuple(v.shape) for n, v in named.items() if isinstance(v, torch.Tensor)}
    main = next((n for n in ("input_ids", "inputs_embeds") if len(shapes.get(n, ())) >= 2), None)
    if main is None:
        return
    batch, length = shapes[main][:2]

    def fits(name: str, shape: tuple) -> bool:
        four_d_mask = name == "attention_mask" and len(shape) == 4
        if not shape or shape[0] != batch and not (shape[0] == 1 and (name in BROADCAST_INPUTS or four_d_mask)):
            return False
        if four_d_mask:
            return shape[2:] == (length, length)
        if name == "labels":
            return (
                len(shape) < 2 or torch.is_floating_point(named[name]) or not labels_follow_tokens or shape[1] == length
            )
        return len(shape) >= 2 and shape[1] == length

    checked = [
        n
        for n in shapes
        if n in SEQUENCE_INPUTS and n not in ("input_ids", "inputs_embeds") and not n.startswith("decoder_")
    ]
    wrong = [n for n in checked if not fits(n, shapes[n])]
    if wrong:
        given = ", ".join(f"{n} {list(shapes[n])}" for n in [main] + checked)
        raise ConfigError(
            f"input shapes do not fit together: {', '.join(wrong)} must match the batch size and "
            f"sequence length of {main} (dim 0 may be 1 for {sorted(BROADCAST_INPUTS)} and 4-D "
            f"attention masks); got {given}."
        )


def call_batch(kwargs: dict[str, Any]) -> int:
    """A call's batch size: the largest dim 0 of its tensor inputs (smaller ones broadcast)."""
    return max((v.shape[0] for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() >= 1), default=1)


def _sequence_axes(name: str, value: torch.Tensor) -> tuple[int, ...]:
    """Which dims of a sequence input are the sequence length: dim 1, except for a 4-D attention mask
    [B, heads or 1, queries, keys], whose last two dims are (without a KV cache both are the length)."""
    if name.endswith("attention_mask") and value.dim() == 4:
        return (2, 3)
    return (1,)


def export_dynamic(
    module: torch.nn.Module, example: dict[str, Any], axes: dict[str, dict[int, str]], max_seq: int
) -> torch.export.ExportedProgram:
    """torch.export (non-strict) with the named dims `axes` ("batch", "seq", ...) dynamic.

    Named Dims first; if export rejects them (a model bounds or guards a size, as BERT does its sequence
    length), once more with Dim.AUTO on the same axes, which adopts the bounds the model proves."""
    dims = {"batch": Dim("batch", min=1, max=MAX_BATCH), "seq": Dim("seq", min=1, max=max_seq)}
    named_dims = {n: ({a: dims.get(d) or Dim(d) for a, d in axes[n].items()} if n in axes else None) for n in example}
    auto_dims = {n: ({a: Dim.AUTO for a in ax} if ax is not None else None) for n, ax in named_dims.items()}
    errors = []
    for dynamic_shapes in (named_dims, auto_dims):
        try:
            with _keyword_forward(module, list(example)):
                return torch.export.export(module, (), example, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # torch raises many types; we retry once with AUTO dims
            errors.append(exc)
    raise CaptureError(
        f"torch.export could not capture {type(module).__name__} with inputs {sorted(example)}: {errors[-1]}"
    ) from errors[-1]


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


def _dim_ranges(program: torch.export.ExportedProgram, example: dict[str, Any]) -> tuple[dict, dict]:
    """Per tensor input: each dim's static size or the (lo, hi) range export proved for it; and each dim's
    symbol (None when static)."""
    leaves, _ = pytree.tree_flatten(((), example))
    leaf_names = _leaf_names(example)
    user_inputs = program.graph_signature.user_inputs
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    ranges: dict[str, tuple] = {}
    symbols: dict[str, tuple] = {}
    for leaf_name, leaf, ph_name in zip(leaf_names, leaves, user_inputs):
        if not isinstance(leaf, torch.Tensor):
            continue
        val = placeholders[ph_name].meta.get("val")
        ranges[leaf_name] = tuple(dim_range(program, size) for size in val.shape)
        symbols[leaf_name] = tuple(
            str(size.node.expr) if isinstance(size, torch.SymInt) else None for size in val.shape
        )
    return ranges, symbols


def dim_range(program: torch.export.ExportedProgram, size: Any) -> Union[int, tuple[int, int]]:
    """A dim of `program`'s inputs as peftfx checks it: its static size, or the (lo, hi) range export
    proved for it, in plain ints.

    Every reader of export's range constraints goes through here: their bounds are sympy numbers and
    may be infinite (sympy's oo and -oo, torch's int_oo and -int_oo), e.g. a sequence longer than the
    position table, GPT-Neo, or a capture run inside dynamo. An infinite end is an open bound."""
    if isinstance(size, int):
        return size
    expr = size.node.expr if isinstance(size, torch.SymInt) else size
    if getattr(expr, "is_number", False):  # a size export specialised to a constant
        return int(expr)
    vr = program.range_constraints.get(expr)
    if vr is None:
        return (1, UNBOUNDED)
    lo, hi = finite_bound(vr.lower), finite_bound(vr.upper)
    return (max(lo, 0) if lo is not None else 0, hi if hi is not None else UNBOUNDED)


def finite_bound(bound: Any) -> Optional[int]:
    """A range bound as an int, or None when it is infinite (or not a number at all)."""
    if isinstance(bound, (IntInfinity, NegativeIntInfinity)):  # sympy calls these finite
        return None
    if isinstance(bound, bool):
        return None
    if isinstance(bound, (int, float)):
        return int(bound) if math.isfinite(bound) else None
    if isinstance(bound, sympy.Basic) and bound.is_number and bound.is_finite:
        return int(bound)
    return None


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

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]  # read by inspect.signature
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
    )
    model.forward = forward
    try:
        yield
    finally:
        if original is None:
            del model.forward
        else:
            model.forward = original


@contextlib.contextmanager
def without_checkpointing(model: torch.nn.Module):
    """Capture with transformers' gradient checkpointing switched off, then switch it back on. Traced,
    its checkpoint wrappers either vanish (non-reentrant) or leave the layers under no_grad (reentrant:
    the loss then has no gradient at all). Block calls checkpoint at run time instead (peftfx/blocks.py)."""
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in switched:
        setattr(module, "gradient_checkpointing", False)  # noqa: B010 - a transformers attribute, not nn.Module's
    try:
        yield
    finally:
        for module in switched:
            setattr(module, "gradient_checkpointing", True)  # noqa: B010


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
