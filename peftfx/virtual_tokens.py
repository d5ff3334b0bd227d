"""Virtual tokens: the parameters of prompt and prefix tuning, and how a call's inputs change for them.

Prompt tuning prepends learned embeddings to the token embeddings; prefix tuning prepends learned keys
and values to every attention layer. Both need a base graph captured with other inputs than the user's:
prompt tuning one that takes `inputs_embeds` of length P+L (every size downstream then follows), prefix
tuning one that takes `position_ids` (the real tokens sit at positions P..P+L-1, as in PEFT). The passes
(passes/prompt.py, passes/prefix.py) then rewrite that graph back to the user's inputs.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Union, cast

import torch
from torch import nn

from .config import PrefixTuningConfig, PromptLearningConfig, PromptTuningConfig
from .errors import ConfigError

PROMPT_KEY = "prompt_embeddings"  # PEFT's checkpoint tensor for prompt learning
PROMPT_HEAD_PREFIX = "base_model."  # PEFT's key prefix for a prompt adapter's saved heads (no ".model.")
TASKS = ("CAUSAL_LM", "SEQ_CLS")


class PromptEmbedding(nn.Module):
    """Prompt tuning's learned rows: `embedding.weight` is [virtual tokens, hidden] (PEFT's naming)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module):
        super().__init__()
        weight = word_embeddings.weight
        dim = cast(int, config.token_dim)  # set by fill_from_model
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim, device=weight.device)
        rows = _initial_rows(config, word_embeddings)
        if rows is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(rows)

    def saved_embeddings(self) -> torch.Tensor:
        return self.embedding.weight


class PrefixEncoder(nn.Module):
    """Prefix tuning's keys and values for every layer: [virtual tokens, layers * 2 * kv dim], either
    learned directly or, with prefix_projection while training, as an MLP over smaller embeddings."""

    def __init__(self, config: PrefixTuningConfig, device: torch.device):
        super().__init__()
        # fill_from_model has set the model-dependent sizes
        tokens, dim = cast(int, config.num_virtual_tokens), cast(int, config.token_dim)
        width = cast(int, config.num_layers) * 2 * dim
        self.projected = config.prefix_projection and not config.inference_mode
        if self.projected:
            hidden = cast(int, config.encoder_hidden_size)
            self.embedding = nn.Embedding(tokens, dim, device=device)
            self.transform = nn.Sequential(
                nn.Linear(dim, hidden, device=device), nn.Tanh(), nn.Linear(hidden, width, device=device)
            )
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(tokens, width, device=device)
            last = self.embedding
        if config.init_weights == "zero":
            with torch.no_grad():
                for p in last.parameters():
                    p.zero_()

    def saved_embeddings(self) -> torch.Tensor:
        """What PEFT saves: the prefix itself (the MLP's output when projected)."""
        if self.projected:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


PromptModule = Union[PromptEmbedding, PrefixEncoder]  # a prompt-learning adapter's owned module


def make_prompt_module(config: PromptLearningConfig, model: nn.Module) -> PromptModule:
    if isinstance(config, PromptTuningConfig):
        return PromptEmbedding(config, input_embeddings(model))
    return PrefixEncoder(cast(PrefixTuningConfig, config), next(model.parameters()).device)


def input_embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    module = get() if callable(get) else None
    if module is None or not hasattr(module, "weight"):
        raise ConfigError(
            f"prompt tuning needs the token embedding of {type(model).__name__}; it has no "
            "get_input_embeddings() returning an embedding module."
        )
    return module


def _initial_rows(config: PromptTuningConfig, word_embeddings: nn.Module):
    """PEFT's initialisations: RANDOM keeps nn.Embedding's normal init; SAMPLE_VOCAB copies random
    vocabulary rows; TEXT copies the rows of the init text's tokens, repeated or cut to length."""
    total = config.total_virtual_tokens
    weight = cast(torch.Tensor, word_embeddings.weight)
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        vocab_ids = torch.randint(0, weight.shape[0], (total,), device=weight.device)
        return word_embeddings(vocab_ids).detach().clone().to(torch.float32)
    if config.prompt_tuning_init == "TEXT":
        ids = text_token_ids(config)
        ids = (ids * math.ceil(total / len(ids)))[:total]
        ids_t = torch.tensor(ids, dtype=torch.long, device=weight.device)
        return word_embeddings(ids_t).detach().clone().to(torch.float32)
    return None


def text_token_ids(config: PromptTuningConfig) -> list[int]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the tokenizer {config.tokenizer_name_or_path!r} for prompt_tuning_init="
            f"'TEXT': {exc}. Give a local tokenizer folder or a cached hub id."
        ) from exc
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to nothing.")
    return list(ids)


# -- a call's inputs ---------------------------------------------------------------------------------


def check_task(config: PromptLearningConfig) -> None:
    if config.task_type not in TASKS:
        raise ConfigError(
            f"{type(config).__name__}.task_type={config.task_type!r} is not supported; use one of "
            f"{TASKS} (the task decides how labels and token types are padded)."
        )


def user_inputs(config: PromptLearningConfig, named: dict[str, Any]) -> dict[str, Any]:
    """The call's inputs the adapted graph takes: PEFT ignores position ids (and, for causal LMs,
    token type ids) under prompt learning, with a warning."""
    named = dict(named)
    dropped = ["position_ids"] + (["token_type_ids"] if config.task_type == "CAUSAL_LM" else [])
    for name in dropped:
        if named.pop(name, None) is not None:
            warnings.warn(f"{name} are ignored under {config.PEFT_TYPE.lower()} (as in PEFT).", stacklevel=4)
    if "input_ids" not in named and "inputs_embeds" not in named:
        raise ConfigError("prompt learning needs input_ids or inputs_embeds.")
    return named


# transformers model types whose forward derives token positions from the attention mask when no
# position_ids are given (OPT: cumsum(mask) * mask - 1). Under PEFT's prefix tuning the mask has P ones in
# front (the cached prefix), so a left-padded row's positions differ from arange(P, P+L). Others in
# transformers 5.23 count positions from the cache (arange), whatever the mask says.
MASK_POSITION_MODELS = ("opt",)


def positions_from_mask(model: nn.Module) -> bool:
    """Whether the model counts its positions in the attention mask (see MASK_POSITION_MODELS)."""
    return getattr(getattr(model, "config", None), "model_type", None) in MASK_POSITION_MODELS


def capture_inputs(config: PromptLearningConfig, named: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Example inputs for the base graph the passes rewrite (sizes matter, values barely)."""
    source = cast(torch.Tensor, named.get("input_ids", named.get("inputs_embeds")))  # user_inputs checked
    batch, length = source.shape[0], source.shape[1]
    p = cast(int, config.num_virtual_tokens)  # validated
    out = dict(named)
    if isinstance(config, PrefixTuningConfig):
        out["position_ids"] = torch.arange(p, p + length, device=source.device).expand(batch, length)
        return out

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([t.new_full((batch, p), value), t], dim=1)

    if "input_ids" in out:
        weight = cast(torch.Tensor, input_embeddings(model).weight)
        out.pop("input_ids")
        out["inputs_embeds"] = weight.new_zeros(batch, p + length, weight.shape[1])
    else:
        out["inputs_embeds"] = pad_embeds(out["inputs_embeds"], p)
    if "attention_mask" in out:
        out["attention_mask"] = pad(out["attention_mask"], 1)
    if "labels" in out and config.task_type == "CAUSAL_LM":
        out["labels"] = pad(out["labels"], -100)
    if "token_type_ids" in out:
        out["token_type_ids"] = pad(out["token_type_ids"], 0)
    return out


def pad_embeds(embeds: torch.Tensor, p: int) -> torch.Tensor:
    return torch.cat([embeds.new_zeros(embeds.shape[0], p, embeds.shape[2]), embeds], dim=1)
