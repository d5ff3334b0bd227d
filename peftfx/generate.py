"""Generation for decoder LMs: one decode graph with a static KV cache, run by a plain Python loop.

The decode graph is the model wrapped in `DecodeStep`, captured once with torch.export: it takes T new
tokens (T = prompt length for the prefill, 1 afterwards), a 2-D attention mask over the whole cache, the
tokens' positions, how many cache entries are filled, and per layer a key and a value cache tensor
`[batch, kv heads, cache length, head dim]` that it writes in place (export keeps these as input
mutations). Batch, T and the cache length are dynamic dims, so every prompt size, batch size and
`max_new_tokens` reuse the same capture.

The capture is a `Capture` like a forward one, so the state manager turns it into variants with the
same pass pipeline: LoRA paths and slot banks (switching adapters is a lookup), merged adapters (the
base graph over merged weights), disabled adapters (the base graph). Prompt and prefix tuning need no
graph rewrite here: their virtual tokens live in the cache. Prompt tuning feeds `inputs_embeds` with the
learned rows in front for the prefill; prefix tuning writes its keys and values into the first P cache
entries before the prefill. Positions and masks follow HF PEFT's `generate` exactly (see `_Plan`).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional, Sequence, Union, cast

import torch
from torch import nn
from torch.export import Dim

from .capture import MAX_BATCH, Capture, Signature, module_mode
from .errors import CaptureError, ConfigError
from .state.variants import VariantSpec
from .virtual_tokens import input_embeddings

DECODE_MARK = "peftfx-decode"  # marks decode captures among a Capturer's forward captures
WRAPPER_PREFIX = "model"  # DecodeStep's attribute holding the user's model
SOURCES = ("input_ids", "inputs_embeds")
SUPPORTED = (
    "input_ids",
    "attention_mask",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "generator",
    "seed",
    "adapter_names",
)


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


def _strip_wrapper(program: torch.export.ExportedProgram) -> None:
    """Module paths as the user's model names them (`model.layers.0...`, not `model.model.layers.0...`),
    so selection and the passes find the same sites as in the forward graph."""
    prefix = WRAPPER_PREFIX + "."
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        node.meta["nn_module_stack"] = {
            key: ((path[len(prefix) :] if path.startswith(prefix) else "" if path == WRAPPER_PREFIX else path), kind)
            for key, (path, kind) in stack.items()
        }


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
    model = pm.base_model
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
        with module_mode(model, False):
            program = torch.export.export(DecodeStep(model, source), (), example, dynamic_shapes=shapes, strict=False)
    except CaptureError:
        raise
    except Exception as exc:  # torch raises many types
        raise CaptureError(f"could not capture a static-cache decode graph of {type(model).__name__}: {exc}") from exc
    _strip_wrapper(program)
    _drop_metadata_asserts(program)
    capture = Capture(signature, program, fuse_eager=False)
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


# -- choosing the next token ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
    """transformers' sampling warpers, in its order: temperature, then top-k, then top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0

    def check(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(
                f"temperature={self.temperature} must be > 0 when sampling; use do_sample=False for greedy decoding."
            )
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be a positive integer (0 or None: no top-k filter).")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1].")

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores to sample from: temperature, top-k and top-p applied; removed tokens are -inf."""
        scores = logits / self.temperature
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative <= (1 - self.top_p)
            drop[..., -1:] = False  # keep at least one token
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return scores

    def choose(self, logits: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Next token per row from the last position's logits [B, vocab] (float32)."""
        if not self.do_sample:
            return logits.argmax(-1)
        probs = self.warp(logits).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _generation_default(model: nn.Module, name: str, value: Any) -> Any:
    if value is not None:
        return value
    return getattr(getattr(model, "generation_config", None), name, None)


def _token_list(value: Union[None, int, Sequence[int], torch.Tensor]) -> Optional[list[int]]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


# -- the loop ---------------------------------------------------------------------------------------------


def generate(
    pm: Any,
    input_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: Optional[int] = None,
    do_sample: Optional[bool] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    adapter_names: Optional[Sequence[str]] = None,
    **unsupported: Any,
) -> torch.Tensor:
    """Prompt ids [B, L] (left-padded, with their mask) -> ids [B, L + new], as transformers' generate
    returns them: rows that hit an eos continue with pad, and the loop stops when all rows have.
    Runs the active adapters in eval mode (no dropout). `generator` or `seed` makes sampling reproducible.
    `adapter_names` (one LoRA adapter name or "__base__" per row) decodes a mixed batch, as in PEFT."""
    if unsupported:
        raise ConfigError(f"generate does not support {sorted(unsupported)}; supported arguments: {list(SUPPORTED)}.")
    if input_ids is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError("generate needs input_ids, a [batch, length] tensor of token ids with length >= 1.")
    if pm.quant is not None:
        raise ConfigError("generate on a quantized base is not supported yet; merge_and_unload() first.")
    model = pm.base_model
    config = getattr(model, "generation_config", None)
    eos = _token_list(_generation_default(model, "eos_token_id", eos_token_id))
    pad = _generation_default(model, "pad_token_id", pad_token_id)
    if pad is None and eos:
        pad = eos[0]  # as transformers does
    temperature = _generation_default(model, "temperature", temperature)
    top_p = _generation_default(model, "top_p", top_p)
    sampling = Sampling(
        do_sample=bool(_generation_default(model, "do_sample", do_sample)),
        temperature=1.0 if temperature is None else float(temperature),
        top_k=_generation_default(model, "top_k", top_k),
        top_p=1.0 if top_p is None else float(top_p),
    )
    sampling.check()
    if seed is not None and generator is None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    if max_new_tokens is None:
        max_new_tokens = getattr(config, "max_new_tokens", None)
        if max_new_tokens is None:
            max_new_tokens = max(0, (getattr(config, "max_length", None) or 20) - input_ids.shape[1])
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 0.")
    if attention_mask is None:
        attention_mask = _default_mask(input_ids, pad, eos)
    if attention_mask.shape != input_ids.shape:
        raise ConfigError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids "
            f"{tuple(input_ids.shape)}; give a 2-D mask of the same shape (1 = token, 0 = padding)."
        )
    if max_new_tokens == 0:
        return input_ids
    with torch.no_grad():
        return _decode(
            pm, input_ids, attention_mask.long(), max_new_tokens, sampling, eos, pad, generator, adapter_names
        )


def _default_mask(input_ids: torch.Tensor, pad: Optional[int], eos: Optional[list[int]]) -> torch.Tensor:
    """transformers' inference: mask out pad tokens when pad is set, present and not an eos token."""
    if pad is not None and bool((input_ids == pad).any()) and (not eos or pad not in eos):
        return input_ids.ne(pad).long()
    return torch.ones_like(input_ids)


def _step_function(
    pm: Any, capture: Capture, spec: Optional[VariantSpec], ids: torch.Tensor, adapter_names: Optional[Sequence[str]]
):
    """The decode variant to run: the active adapters' (as a forward call picks it), the prompt-learning
    adapter's, or a mixed batch's with its per-row adapter index bound."""
    if adapter_names is not None:
        if spec is not None:
            raise ConfigError(
                "adapter_names (mixed batches) does not work with prompt-learning adapters "
                "(as in PEFT); use LoRA, DoRA or IA3 adapters."
            )
        return pm.state.mixed_runner(capture, adapter_names, {"input_ids": ids}, training=False)
    if spec is None and not pm.state.disabled:
        pm.state.before_run(pm.state.bound_adapters(), training=False)
    return pm.state.variant(capture, spec)[1]


def _decode(
    pm: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    new: int,
    sampling: Sampling,
    eos: Optional[list[int]],
    pad: Optional[int],
    generator: Optional[torch.Generator],
    adapter_names: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    plan, spec = _plan(pm)
    capture = decode_capture(pm, plan.source)
    run = _step_function(pm, capture, spec, ids, adapter_names)
    batch, length = ids.shape
    p = plan.virtual
    size = p + length + new
    keys, values = _empty_cache(pm.base_model, batch, size, ids.device)
    full_mask = torch.zeros(batch, size, dtype=torch.long, device=ids.device)
    full_mask[:, :p] = 1
    full_mask[:, p : p + length] = mask
    filled = 0
    if plan.prefix is not None:
        for layer in range(len(keys)):  # prefix keys and values: [P, kv heads, d] -> cache entries 0..P-1
            keys[layer][:, :, :p] = plan.prefix[:, 2 * layer].transpose(0, 1).to(keys[layer].dtype)
            values[layer][:, :, :p] = plan.prefix[:, 2 * layer + 1].transpose(0, 1).to(values[layer].dtype)
        filled = p
    if plan.cache_positions:
        positions = torch.arange(p + length, device=ids.device).expand(batch, -1)
    else:
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0) + p
    if plan.prompt is not None:
        embed = input_embeddings(pm.base_model)
        words = embed(ids)
        tokens = torch.cat([plan.prompt.to(words.dtype).expand(batch, -1, -1), words], 1)
    else:
        tokens = ids
    eos_t = torch.tensor(eos, device=ids.device) if eos else None
    unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
    out = [ids]
    for step in range(new):
        logits = run(
            tokens=tokens,
            attention_mask=full_mask,
            position_ids=positions,
            cache_length=torch.tensor(filled, device=ids.device),
            keys=keys,
            values=values,
        )
        filled += tokens.shape[1]
        chosen = sampling.choose(logits.float(), generator)
        if eos_t is not None and pad is not None:
            chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
        out.append(chosen[:, None])
        if eos_t is not None:
            unfinished &= ~torch.isin(chosen, eos_t)
            if not bool(unfinished.any()):
                break
        if step == new - 1:
            break
        full_mask[:, filled] = 1
        positions = positions[:, -1:] + 1
        tokens = embed(chosen[:, None]) if plan.prompt is not None else chosen[:, None]
    return torch.cat(out, 1)
