"""Prompt learning: prompt tuning (learned embeddings in front of the tokens) and prefix tuning (learned
keys and values in front of every attention layer's), PEFT's PromptEmbedding and PrefixEncoder.

Both capture the base graph with other inputs than the user's (virtual tokens' sizes, peftfx/
virtual_tokens.py) and rewrite it back to the user's inputs (passes/prompt.py, passes/prefix.py).
The checkpoint is PEFT's single `prompt_embeddings` tensor plus any saved heads. One prompt-learning
adapter runs at a time; they do not merge, mix or combine (as in PEFT).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional, cast

from torch import nn

from peftfx.passes import prefix as prefix_pass
from peftfx.passes import prompt as prompt_pass

from ..config import PrefixTuningConfig, PromptLearningConfig, PromptTuningConfig, fill_from_model
from ..errors import ConfigError
from ..virtual_tokens import (
    PROMPT_HEAD_PREFIX,
    PROMPT_KEY,
    capture_inputs,
    check_task,
    input_embeddings,
    make_prompt_module,
    user_inputs,
)
from .base import AdapterMethod, AdapterPlan, Entry, MethodEnv, modules_to_save_paths

if TYPE_CHECKING:
    from ..state.store import AdapterStore

PROMPT_ROOT = "prompt_encoder"  # PEFT's name of the module holding an adapter's virtual tokens


class PromptLearning(AdapterMethod):
    """What prompt and prefix tuning share; the subclasses name their config and pass."""

    stage = "inputs"
    saved_key_prefix = PROMPT_HEAD_PREFIX  # PEFT keys a prompt adapter's saved heads without ".model."

    def prepare_config(self, config: Any, model: nn.Module, from_checkpoint: bool) -> Any:
        check_task(config)
        if isinstance(config, PromptTuningConfig):
            input_embeddings(model)  # refuse a model without a token embedding now, not at the first call
        config = fill_from_model(config, model)
        if from_checkpoint and getattr(config, "prefix_projection", False):
            # the file holds the projected prefix; the MLP that made it is not saved (as in PEFT)
            config = dataclasses.replace(config, inference_mode=True)
        return config

    def plan(self, env: MethodEnv, name: str, config: Any) -> AdapterPlan:
        module = make_prompt_module(config, env.model)  # not attached to anything yet
        return AdapterPlan(
            name, config, self, [], modules_to_save_paths(env.model, config), [], extra={"module": module}
        )

    def entries(self, env: MethodEnv, plan: AdapterPlan) -> list[Entry]:
        module = plan.extra["module"] if "module" in plan.extra else env.store.prompts[plan.name]
        saved = module.saved_embeddings()
        return [
            Entry(
                PROMPT_KEY,
                "store",
                f"{PROMPT_ROOT}.{plan.name}.embedding.weight",
                tuple(saved.shape),
                read=module.saved_embeddings,
            )
        ]

    def create(self, env: MethodEnv, plan: AdapterPlan) -> None:
        env.store.add_owned_module(plan.name, PROMPT_ROOT, plan.extra["module"])

    def call_inputs(
        self, store: "AdapterStore", adapter: str, named: dict[str, Any], model: nn.Module
    ) -> Optional[tuple[dict[str, Any], dict[str, Any], str]]:
        config = cast(PromptLearningConfig, store.configs[adapter])
        named = user_inputs(config, named)
        source = "input_ids" if "input_ids" in named else "inputs_embeds"
        return capture_inputs(config, named, model), named, source

    def check_decoding(self, store: "AdapterStore", adapter: str) -> Any:
        config = store.configs[adapter]
        if config.task_type != "CAUSAL_LM":
            raise ConfigError(f"generate needs a CAUSAL_LM adapter; {adapter!r} has task_type={config.task_type!r}.")
        return config


class PromptTuning(PromptLearning):
    name = "prompt_tuning"
    peft_type = "PROMPT_TUNING"
    config_class = PromptTuningConfig
    passes = (prompt_pass.PASS,)

    def decode_plan(self, store: "AdapterStore", adapter: str, model: nn.Module) -> dict[str, Any]:
        """The prefill feeds cat(prompt, embed(ids)); positions are cache indexes (PEFT drops position ids)."""
        self.check_decoding(store, adapter)
        rows = store.prompts[adapter].saved_embeddings()
        return dict(source="inputs_embeds", virtual=rows.shape[0], prompt=rows, cache_positions=True)


class PrefixTuning(PromptLearning):
    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    config_class = PrefixTuningConfig
    passes = (prefix_pass.PASS,)

    def decode_plan(self, store: "AdapterStore", adapter: str, model: nn.Module) -> dict[str, Any]:
        """The KV cache starts with the prefix (P entries); positions are transformers' + P."""
        from ..generate import cache_geometry

        config = self.check_decoding(store, adapter)
        layers, kv_heads, head_dim = cache_geometry(model)
        if (config.num_layers, config.num_attention_heads, config.kv_head_dim) != (layers, kv_heads, head_dim):
            raise ConfigError(
                f"prefix tuning adapter {adapter!r} has {config.num_layers} layers of "
                f"{config.num_attention_heads} heads x {config.kv_head_dim}, but the model's KV cache "
                f"has {layers} x {kv_heads} x {head_dim}; set num_layers/num_attention_heads/token_dim "
                "to match."
            )
        rows = store.prompts[adapter].saved_embeddings()
        table = rows.reshape(config.num_virtual_tokens, 2 * layers, kv_heads, head_dim)
        return dict(virtual=config.num_virtual_tokens, prefix=table)


PROMPT_TUNING = PromptTuning()
PREFIX_TUNING = PrefixTuning()
