"""Generation for decoder LMs: transformers' `generate` driving one decode graph with a static KV cache.

The decode graph is the model wrapped in `DecodeStep`, captured once with torch.export: it takes T new
tokens (T = prompt length for the prefill, 1 afterwards), a 2-D attention mask over the whole cache, the
tokens' positions, how many cache entries are filled, and per layer a key and a value cache tensor
`[batch, kv heads, cache length, head dim]` that it writes in place (export keeps these as input
mutations). Batch, T and the cache length are dynamic dims, so every prompt size, batch size (beams
included) and `max_new_tokens` reuse the same capture.

The capture is a `Capture` like a forward one, so the state manager turns it into variants with the
same pass pipeline: LoRA paths and slot banks (switching adapters is a lookup), merged adapters (the
base graph over merged weights), disabled adapters (the base graph), mixed batches. Prompt and prefix
tuning need no graph rewrite here: their virtual tokens live in the cache. Prompt tuning feeds
`inputs_embeds` with the learned rows in front for the prefill; prefix tuning writes its keys and
values into the first P cache entries before the prefill. Positions and masks follow HF PEFT's
`generate` exactly (see `_Plan`).

The loop is transformers' own: `generate` hands a `DecodeStepper` (peftfx/generate_hf.py) to
`GenerationMixin.generate`, so every generation feature (beam search, sampling, logits processors,
stopping criteria, streamers, generation_config, return_dict_in_generate) is transformers' code; this
module decides which variant runs and what the cache starts with (`Feed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union, cast

import torch
from torch import nn
from torch.export import Dim

from .capture import MAX_BATCH, Capture, Signature, module_mode, strip_wrapper
from .errors import CaptureError, ConfigError
from .generate_hf import DecodeCache, DecodeStepper, Feed, Run
from .progress import get_logger, timed
from .state.variants import VariantSpec
from .virtual_tokens import input_embeddings

log = get_logger("generate")

if TYPE_CHECKING:
    from transformers.utils import ModelOutput

DECODE_MARK = "peftfx-decode"  # marks decode captures among a Capturer's forward captures
WRAPPER_PREFIX = "model"  # DecodeStep's attribute holding the user's model
SOURCES = ("input_ids", "inputs_embeds")
# Arguments transformers' generate has no use for here, with what to do instead.
REFUSED = {
    "generator": "sampling draws from torch's global RNG as in transformers; pass seed=N or call torch.manual_seed",
}


@contextlib.contextmanager
def keep_rng(device: torch.device) -> Iterator[None]:
    """Run a block without moving torch's global RNG (CPU and the device's): capturing and building
    variants must not change what a seeded sampling call draws."""
    cuda = device.type == "cuda"
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        yield


class DecodeStep(nn.Module):
    """One decode step over a caller-owned static cache (the module torch.export captures)."""

    def __init__(self, model: nn.Module, source: str):
        super().__init__()
        self.model = model
        self.source = source

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache_length: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        from transformers.cache_utils import StaticCache, StaticLayer

        cache = StaticCache(config=self.model.config, max_cache_len=keys[0].shape[2])
        if len(cache.layers) != len(keys) or any(type(layer) is not StaticLayer for layer in cache.layers):
            raise CaptureError(
                "generate supports models whose static cache is one full-attention StaticLayer per "
                "layer (no sliding-window or hybrid caches)."
            )
        for layer, k, v in zip(cache.layers, keys, values):
            layer.keys, layer.values = k, v  # the graph's inputs: index_copy_ into them is an input mutation
            layer.cumulative_length = cache_length.clone()
            layer.dtype, layer.device = k.dtype, k.device
            layer.batch_size, layer.num_heads, layer.max_cache_len, layer.k_head_dim = k.shape
            layer.v_head_dim = v.shape[-1]
            layer.is_initialized = True
        takes = inspect.signature(self.model.forward).parameters
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}  # as transformers' generate
        out = self.model(
            **{self.source: tokens},
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **last_only,
        )
        return out.logits[:, -1]


# -- capture ------------------------------------------------------------------------------------------


def cache_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of an HF decoder's KV cache, from its config."""
    config: Any = getattr(model, "config", None)  # None fails below with the AttributeError reported
    try:
        layers = config.num_hidden_layers
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    except AttributeError as exc:
        raise ConfigError(
            f"generate needs a transformers decoder LM (a config with layer and head counts); "
            f"{type(model).__name__} has none: {exc}"
        ) from None
    return int(layers), int(kv_heads), int(head_dim)


def _cache_dtype(model: nn.Module) -> torch.dtype:
    return cast(torch.Tensor, input_embeddings(model).weight).dtype


def _empty_cache(model: nn.Module, batch: int, length: int, device) -> tuple[list, list]:
    layers, kv_heads, head_dim = cache_geometry(model)
    dtype = _cache_dtype(model)

    def make() -> list[torch.Tensor]:
        return [torch.zeros(batch, kv_heads, length, head_dim, dtype=dtype, device=device) for _ in range(layers)]

    return make(), make()


def _drop_metadata_asserts(program: torch.export.ExportedProgram) -> None:
    """Export's per-step dtype/device checks on intermediate tensors: a decode step is small, so these
    interpreted no-op calls cost several percent of it. Sizes and dtypes are fixed by `generate` itself."""
    graph = program.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    program.graph_module.recompile()


def decode_capture(pm: Any, source: str) -> Capture:
    """The decode graph of `pm`'s model taking `source` (token ids or embeddings), captured once and
    kept with the forward captures (so `.to()` and quantization drop it like them)."""
    model = pm.get_base_model()
    weight = cast(torch.Tensor, input_embeddings(model).weight)
    device = weight.device
    signature = Signature(((DECODE_MARK, source, str(_cache_dtype(model)), str(device)),), training=False)
    found = pm.state.capturer.find(signature)
    if found is not None:
        return found
    batch, new, length = 2, 3, 8  # example sizes: all > 1 so export keeps them symbolic
    if source == "input_ids":
        tokens = torch.ones(batch, new, dtype=torch.long, device=device)
    else:
        tokens = torch.zeros(batch, new, weight.shape[1], dtype=_cache_dtype(model), device=device)
    keys, values = _empty_cache(model, batch, length, device)
    example = dict(
        tokens=tokens,
        attention_mask=torch.ones(batch, length, dtype=torch.long, device=device),
        position_ids=torch.arange(new, device=device).expand(batch, new),
        cache_length=torch.tensor(0, device=device),
        keys=keys,
        values=values,
    )
    b, t, c = Dim("batch", min=1, max=MAX_BATCH), Dim("new", min=1, max=MAX_BATCH), Dim("cache", min=2, max=MAX_BATCH)
    per_layer = [{0: b, 2: c}] * len(keys)
    shapes = dict(
        tokens={0: b, 1: t},
        attention_mask={0: b, 1: c},
        position_ids={0: b, 1: t},
        cache_length=None,
        keys=per_layer,
        values=list(per_layer),
    )
    try:
        what = f"capturing the decode step of {type(model).__name__} with torch.export"
        with module_mode(model, False), keep_rng(device), timed(log, what):
            program = torch.export.export(DecodeStep(model, source), (), example, dynamic_shapes=shapes, strict=False)
    except CaptureError:
        raise
    except Exception as exc:  # torch raises many types
        raise CaptureError(f"could not capture a static-cache decode graph of {type(model).__name__}: {exc}") from exc
    strip_wrapper(program, WRAPPER_PREFIX)  # the user's module paths, as in the forward graph
    _drop_metadata_asserts(program)
    capture = Capture(signature, program, fuse_eager=False, blocks=False)
    pm.state.capturer.add(capture)
    return capture


# -- the decode plan: what the cache, masks and positions hold for the active adapters -----------------


@dataclasses.dataclass
class _Plan:
    """How one generate call feeds the decode graph.

    LoRA / none: positions = cumsum(mask) - 1 (0 on padding), as transformers' generate.
    Prompt tuning (PEFT drops position ids): positions = cache index; the prefill feeds
      cat(prompt, embed(ids)); every mask has P ones in front.
    Prefix tuning: the cache starts with the prefix (P entries); positions = transformers' + P; P ones in front.
    """

    source: str = "input_ids"
    virtual: int = 0
    prompt: Optional[torch.Tensor] = None  # prompt tuning's rows [P, hidden]
    prefix: Optional[torch.Tensor] = None  # prefix tuning's table [P, 2 * layers, kv heads, head dim]
    cache_positions: bool = False  # positions = cache index (prompt tuning)


def _plan(pm: Any) -> tuple[_Plan, Optional[VariantSpec]]:
    """The plan for the active adapters, and the variant spec for an adapter whose method feeds the
    decode graph itself (`AdapterMethod.decode_plan`, prompt learning: its virtual tokens go into the
    cache or the embeddings, so the graph is the base one plus its saved modules). None: the state's
    usual variant (LoRA, merged, disabled)."""
    state = pm.state
    adapter = state.input_adapter()
    if adapter is None:
        return _Plan(), None
    fields = state.store.method_of(adapter).decode_plan(state.store, adapter, state.model)
    saved = (adapter,) if state.store.saved.get(adapter) else ()
    return _Plan(**fields), VariantSpec(saved=saved, training=False)


# -- the entry point ------------------------------------------------------------------------------------


def generate(pm: Any, *args: Any, **kwargs: Any) -> Union[torch.Tensor, "ModelOutput"]:
    """transformers' `generate` over the active adapters' decode graph: every argument of
    `GenerationMixin.generate` (greedy, sampling, beam search, logits processors, stopping criteria,
    streamers, generation_config, return_dict_in_generate, inputs_embeds, ...), and what it returns
    (a tensor, or a GenerateOutput). Extra arguments: PEFT's `adapter_names` (one adapter name or
    "__base__" per row, a mixed batch) and `seed` (sampling as after `torch.manual_seed(seed)`, without
    changing the global RNG). Runs the eval graph (no dropout)."""
    for name, instead in REFUSED.items():
        if name in kwargs:
            raise ConfigError(f"generate does not take {name}=: {instead}.")
    if pm.quant is not None:
        raise ConfigError("generate on a quantized base is not supported yet; merge_and_unload() first.")
    seed = kwargs.pop("seed", None)
    adapter_names = kwargs.pop("adapter_names", None)
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if isinstance(ids, torch.Tensor) and (ids.dim() != 2 or ids.dtype.is_floating_point):
        raise ConfigError(
            f"generate needs input_ids as a [batch, length] tensor of token ids; got shape {tuple(ids.shape)} "
            f"({ids.dtype}). Prompt embeddings go in inputs_embeds."
        )
    mask = kwargs.get("attention_mask")
    if isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
        raise ConfigError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}; give a 2-D mask "
            "of the same shape (1 = token, 0 = padding)."
        )
    model = pm.get_base_model()
    stepper = DecodeStepper(model, _feed(pm, adapter_names), getattr(pm, "generation_config", None))
    run = cast(Any, stepper).generate  # GenerationMixin.generate (transformers is untyped here)
    if seed is None:
        return run(*args, **kwargs)
    with keep_rng(stepper.device):
        torch.manual_seed(seed)
        return run(*args, **kwargs)


def _feed(pm: Any, adapter_names: Optional[Sequence[str]]) -> Feed:
    """The peftfx side of one call: the plan of the active adapters, how to make the cache, and the
    decode variants (made when transformers has sized the batch: beams repeat rows)."""
    plan, spec = _plan(pm)
    model = pm.get_base_model()
    device = cast(torch.Tensor, input_embeddings(model).weight).device
    if adapter_names is not None:
        if spec is not None:
            raise ConfigError(
                "adapter_names (mixed batches) does not work with prompt-learning adapters "
                "(as in PEFT); use LoRA, DoRA or IA3 adapters."
            )
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ConfigError("adapter_names takes a list with one adapter name (or '__base__') per row.")
        adapter_names = list(adapter_names)

    def runs(source: str, rows: int, groups: int) -> Run:
        names = None
        if adapter_names is not None:
            if len(adapter_names) * groups != rows:
                raise ConfigError(
                    f"adapter_names has {len(adapter_names)} entries but the batch has {rows // groups} rows."
                )
            names = [n for n in adapter_names for _ in range(groups)]  # beams / return sequences repeat rows
        with keep_rng(device):
            return _step_function(pm, decode_capture(pm, source), spec, rows, names)

    def new_cache(rows: int, entries: int) -> DecodeCache:
        keys, values = _empty_cache(model, rows, entries, device)
        if plan.prefix is not None:  # prefix keys and values: [P, kv heads, d] -> cache entries 0..P-1
            p = plan.virtual
            for layer in range(len(keys)):
                keys[layer][:, :, :p] = plan.prefix[:, 2 * layer].transpose(0, 1).to(keys[layer].dtype)
                values[layer][:, :, :p] = plan.prefix[:, 2 * layer + 1].transpose(0, 1).to(values[layer].dtype)
        return DecodeCache(keys, values, plan.virtual, prefilled=plan.prefix is not None)

    return Feed(
        runs=runs,
        new_cache=new_cache,
        embed=input_embeddings(model),
        virtual=plan.virtual,
        step_source=plan.source,
        prompt=plan.prompt,
        cache_positions=plan.cache_positions,
    )


def _step_function(
    pm: Any, capture: Capture, spec: Optional[VariantSpec], rows: int, adapter_names: Optional[Sequence[str]]
) -> Run:
    """The decode variant to run: the active adapters' (as a forward call picks it), the prompt-learning
    adapter's, or a mixed batch's with its per-row adapter index bound."""
    if adapter_names is not None:
        placeholder = torch.empty(rows, 0)  # mixed_runner reads the batch size from the call's inputs
        return pm.state.mixed_runner(capture, adapter_names, {"input_ids": placeholder}, training=False)
    if spec is None and not pm.state.disabled:
        pm.state.before_run(pm.state.bound_adapters(), training=False)
    return cast(Run, pm.state.variant(capture, spec)[1])
