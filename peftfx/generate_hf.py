"""The transformers side of `pm.generate`: peftfx's decode graph as the model that transformers'
`GenerationMixin.generate` drives.

`DecodeStepper` is a small `nn.Module` + `GenerationMixin` with the base model's config and generation
config. transformers' `generate` does everything it does for its own models (generation config,
logits processors, stopping criteria, streamers, beam search, sampling with torch's global RNG, the
returned `GenerateOutput`), and every model call it makes is one run of a decode graph over a
`DecodeCache`, a transformers `Cache` that owns the static K/V tensors the graph writes in place, the
2-D mask over them and the next positions. Which graph runs and what the cache holds before the
prefill (prompt or prefix tuning's virtual tokens) is decided on the peftfx side (peftfx/generate.py)
and handed over as a `Feed`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .errors import ConfigError

Run = Callable[..., torch.Tensor]  # a decode variant: (tokens, attention_mask, ...) -> last logits [B, vocab]


class DecodeCache(Cache):
    """The decode graph's KV cache as transformers' `generate` sees it.

    `keys[i]` / `values[i]` are `[rows, kv heads, entries, head dim]` tensors the graph writes in place;
    `mask` is the 2-D mask over all entries (1 = a written token or a virtual one, 0 = padding or not
    yet written); `filled` counts written entries (virtual ones included), `seen` the tokens of
    generate's `input_ids` already in the cache (what `get_seq_length` reports); `positions` are the
    next token's positions per row, `length` the 0-dim tensor decode steps pass as `cache_length`. Beam
    search reorders rows (`reorder_cache`); cropping drops the last entries. It reports itself as not
    compileable, so transformers neither builds 4-D masks for it nor compiles the stepper itself
    (`pm.compile()` compiles the decode graph)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], virtual: int, prefilled: bool):
        super().__init__(layers=[])
        self.keys, self.values = keys, values
        rows, _, entries, _ = keys[0].shape
        self.mask = torch.zeros(rows, entries, dtype=torch.long, device=keys[0].device)
        self.mask[:, :virtual] = 1
        self.virtual = virtual
        self.filled = virtual if prefilled else 0
        self.seen = 0
        self.positions: Optional[torch.Tensor] = None
        # `cache_length` of decode steps, refilled in place: making a `torch.tensor(filled)` per step costs
        # several times a `fill_` (the graph clones its input before use, so no step keeps the old value)
        self.length = torch.zeros((), dtype=torch.long, device=keys[0].device)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        rows, _, entries, _ = self.keys[0].shape
        return f"DecodeCache(layers={len(self.keys)}, rows={rows}, entries={entries}, filled={self.filled})"

    @property
    def started(self) -> bool:
        return self.positions is not None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return self.keys[0].shape[2]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.keys = [fn(k) for k in self.keys]
        self.values = [fn(v) for v in self.values]
        self.mask = fn(self.mask)
        if self.positions is not None:
            self.positions = fn(self.positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues beam `beam_idx[i]`."""
        index = beam_idx.to(self.mask.device)
        self._map_rows(lambda t: t.index_select(0, index))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove.")
        drop = min(-tokens_to_remove, self.seen)
        if drop == 0:
            return
        self.mask[:, self.filled - drop : self.filled] = 0
        self.filled -= drop
        self.seen -= drop
        if self.positions is not None:
            self.positions = self.positions - drop

    def reset(self) -> None:
        raise ConfigError("a peftfx DecodeCache belongs to one generate call; it cannot be reset and reused.")


@dataclasses.dataclass
class Feed:
    """What the peftfx side decided for one generate call.

    `runs(source, rows, groups)` gives the decode variant taking `source` ("input_ids" or
    "inputs_embeds") for `rows` cache rows made of `groups` rows of the user's batch (beam search and
    num_return_sequences repeat each row). `new_cache(rows, entries)` makes the cache tensors, the
    prefix already written for prefix tuning. `step_source` is what decode steps feed (token ids, or
    their embeddings for prompt tuning, whose capture takes embeddings); `prompt` the prompt-tuning
    rows put in front of the prefill; `cache_positions`: positions are cache indexes (PEFT drops
    position ids for prompt tuning), else transformers' positions plus `virtual` (prefix tuning)."""

    runs: Callable[[str, int, int], Run]
    new_cache: Callable[[int, int], DecodeCache]
    embed: nn.Module
    virtual: int = 0
    step_source: str = "input_ids"
    prompt: Optional[torch.Tensor] = None
    cache_positions: bool = False


class DecodeStepper(nn.Module, GenerationMixin):
    """The model transformers' `generate` drives: each forward is one run of a decode graph.

    It carries the base model's `config`, `generation_config`, `device` and `main_input_name`, so
    transformers prepares inputs, lengths and special tokens as for the base model itself. It keeps
    `generate`'s per-step work small: the cache owns the mask and positions, so
    `_update_model_kwargs_for_generation` grows nothing, and `prepare_inputs_for_generation` passes
    just the new tokens."""

    model: nn.Module
    main_input_name = "input_ids"
    _is_stateful = False
    SUPPORTED_MODES = (
        GenerationMode.GREEDY_SEARCH,
        GenerationMode.SAMPLE,
        GenerationMode.BEAM_SEARCH,
        GenerationMode.BEAM_SAMPLE,
    )

    def __init__(self, model: nn.Module, feed: Feed, generation_config: Any = None):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: the stepper owns nothing of the model
        self.config = model.config
        self.generation_config = model.generation_config if generation_config is None else generation_config
        self.main_input_name = getattr(model, "main_input_name", "input_ids")
        self.feed = feed
        self._prefill_run: Optional[Run] = None
        self._step_run: Optional[Run] = None
        self._output = CausalLMOutputWithPast()
        self._device = next(iter(model.parameters())).device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.model.parameters())).dtype

    # -- what transformers' generate asks of a PreTrainedModel ----------------------------------------

    def can_generate(self) -> bool:
        return True

    def is_remote_code(self) -> bool:
        return False

    def get_experts_implementation(self) -> dict[str, Any]:
        return {}  # no mixture-of-experts kernels to switch for decoding

    def set_experts_implementation(self, implementation: Any) -> None:
        pass

    def get_input_embeddings(self) -> nn.Module:
        return self.feed.embed

    def get_compiled_call(self, compile_config: Any) -> Callable[..., Any]:
        return self.__call__  # never reached: DecodeCache is not compileable; pm.compile() compiles the graph

    def _validate_generation_mode(self, generation_mode: Any, generation_config: Any, mode_kwargs: Any) -> None:
        if generation_mode not in self.SUPPORTED_MODES:
            raise ConfigError(
                f"generate: {generation_mode.value} is not supported by peftfx's decode graph (it returns the "
                "last position's logits only); use greedy decoding, sampling or beam search."
            )
        super()._validate_generation_mode(generation_mode, generation_config, mode_kwargs)

    def _prepare_cache_for_generation(
        self,
        generation_config: Any,
        model_kwargs: dict[str, Any],
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """Our cache instead of transformers' (sized as transformers sizes its static cache, plus the
        virtual tokens), and the decode variants this call runs."""
        if model_kwargs.get("past_key_values") is not None:
            raise ConfigError(
                "generate builds its own static KV cache; past_key_values cannot be passed in (generate from "
                "the whole sequence instead)."
            )
        groups = max(generation_config.num_beams, generation_config.num_return_sequences)
        rows = batch_size * groups
        feed = self.feed
        model_kwargs["past_key_values"] = feed.new_cache(rows, max(2, feed.virtual + max_cache_length))
        prefill_source = "inputs_embeds" if model_kwargs.get("inputs_embeds") is not None else "input_ids"
        if feed.prompt is not None:
            if prefill_source == "inputs_embeds":
                raise ConfigError(
                    "generate with inputs_embeds does not work with a prompt-tuning adapter (as in PEFT); pass "
                    "input_ids."
                )
            prefill_source = "inputs_embeds"
        self._prefill_run = feed.runs(prefill_source, rows, groups)
        same = prefill_source == feed.step_source
        self._step_run = self._prefill_run if same else feed.runs(feed.step_source, rows, groups)

    def _update_model_kwargs_for_generation(
        self, outputs: Any, model_kwargs: dict[str, Any], is_encoder_decoder: bool = False, num_new_tokens: int = 1
    ) -> dict[str, Any]:
        model_kwargs["past_key_values"] = outputs.past_key_values  # mask and positions live in the cache
        return model_kwargs

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: Optional[DecodeCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The prefill gets the prompt (ids or embeddings) with its mask and positions; every later
        step only its new token: what it attends to is in the cache."""
        cache = past_key_values
        if cache is None or not isinstance(cache, DecodeCache):
            raise ConfigError("generate lost peftfx's decode cache; pass use_cache=True (the default).")
        inputs: dict[str, Any] = {"past_key_values": cache}
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.get(name):
                inputs[name] = True
        device = self._device
        if cache.started:
            inputs["input_ids"] = input_ids[:, -1:].to(device)  # a no-op unless the prompt was on another device
            return inputs
        prompt = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        prompt["position_ids"] = position_ids
        inputs.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prompt.items()})
        return inputs

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[DecodeCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Optional[int] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> CausalLMOutputWithPast:
        """One decode-graph run over the cache: the prefill when the cache has not started, else one
        new token per row. Logits of the last position only, as transformers' generate asks
        (`logits_to_keep=1`)."""
        if output_attentions or output_hidden_states:
            raise ConfigError(
                "generate cannot return attentions or hidden states: the decode graph returns logits only; "
                "drop output_attentions / output_hidden_states."
            )
        cache = past_key_values
        if not isinstance(cache, DecodeCache):
            raise ConfigError("DecodeStepper runs over the DecodeCache that generate makes for it.")
        if not cache.started:
            logits = self._run_prefill(cache, input_ids, inputs_embeds, attention_mask, position_ids)
            self._output = CausalLMOutputWithPast(logits=logits[:, None], past_key_values=cache)
            return self._output
        # One output object per call, its logits replaced each step (building a ModelOutput costs about
        # as much as a tenth of a small model's decode step; generate reads .logits and drops it).
        self._output["logits"] = self._run_step(cache, input_ids)[:, None]
        return self._output

    def _run_prefill(
        self,
        cache: DecodeCache,
        input_ids: Optional[torch.Tensor],
        inputs_embeds: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
    ) -> torch.Tensor:
        feed = self.feed
        assert self._prefill_run is not None, "the cache is prepared before the first forward"
        tokens: torch.Tensor
        if inputs_embeds is not None:
            tokens = inputs_embeds
        elif input_ids is not None:
            tokens = input_ids
        else:
            raise ConfigError("generate needs input_ids or inputs_embeds.")
        rows, length = tokens.shape[:2]
        if rows != cache.batch_size:
            raise ConfigError(f"generate prepared {cache.batch_size} cache rows but the prompt has {rows}.")
        if feed.prompt is not None:  # prompt tuning: the learned rows in front of the prompt's embeddings
            words = feed.embed(tokens)
            tokens = torch.cat([feed.prompt.to(words.dtype).expand(rows, -1, -1), words], 1)
        start, written = cache.filled, tokens.shape[1]
        if start + written > cache.mask.shape[1]:
            raise ConfigError(f"the prompt needs {start + written} cache entries, the cache has {cache.mask.shape[1]}.")
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (rows, length):
                raise ConfigError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the prompt is {rows} x {length}; "
                    "give a 2-D mask of the same shape (1 = token, 0 = padding)."
                )
            cache.mask[:, start + written - length : start + written] = attention_mask
        else:
            cache.mask[:, start : start + written] = 1
        virtual = feed.virtual
        if feed.cache_positions:
            positions = torch.arange(start + written, device=tokens.device).expand(rows, -1)
        else:
            if position_ids is None:
                position_ids = torch.arange(length, device=tokens.device)[None]
            if position_ids.shape[-1] != length:
                raise ConfigError(f"position_ids cover {position_ids.shape[-1]} tokens but the prompt has {length}.")
            positions = position_ids.expand(rows, -1) + virtual
        logits = self._prefill_run(
            tokens=tokens,
            attention_mask=cache.mask,
            position_ids=positions,
            cache_length=torch.tensor(start, device=tokens.device),
            keys=cache.keys,
            values=cache.values,
        )
        cache.filled = start + written
        cache.seen = input_ids.shape[1] if input_ids is not None else 0
        cache.positions = positions[:, -1:] + 1
        return logits

    def _run_step(self, cache: DecodeCache, input_ids: Optional[torch.Tensor]) -> torch.Tensor:
        assert self._step_run is not None and cache.positions is not None and input_ids is not None
        if cache.filled >= cache.mask.shape[1]:
            raise ConfigError(f"generate ran past its cache of {cache.mask.shape[1]} entries.")
        tokens = self.feed.embed(input_ids) if self.feed.step_source == "inputs_embeds" else input_ids
        filled = cache.filled
        cache.mask[:, filled] = 1
        logits = self._step_run(
            tokens=tokens,
            attention_mask=cache.mask,
            position_ids=cache.positions,
            cache_length=cache.length.fill_(filled),
            keys=cache.keys,
            values=cache.values,
        )
        cache.filled = filled + 1
        cache.seen += 1
        cache.positions = cache.positions + 1
        return logits
