"""The adapter methods peftfx knows: one module each, registered here (the only line a new method adds).

`METHODS` is in pipeline order for methods of the same stage. `method_for(config)` finds the method that
claims a config (DoRA claims a LoraConfig with use_dora=True before LoRA sees it).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import AdapterMethod, AdapterPlan, Entry, MethodEnv
from .dora import METHOD as DORA
from .ia3 import METHOD as IA3
from .lora import METHOD as LORA
from .prompt import PREFIX_TUNING, PROMPT_TUNING

METHODS: tuple[AdapterMethod, ...] = (
    PROMPT_TUNING,
    PREFIX_TUNING,
    DORA,
    LORA,
    IA3,
)


def method_for(config: Any) -> AdapterMethod:
    """The method that claims `config`."""
    for method in METHODS:
        if method.claims(config):
            return method
    raise ConfigError(
        f"no adapter method handles {type(config).__name__} (peft_type "
        f"{getattr(config, 'peft_type', None)!r}); known: {[m.peft_type for m in METHODS]}."
    )


def config_classes() -> dict[str, type]:
    """Config class name -> class, for every registered method (peftfx exports them)."""
    return {m.config_class.__name__: m.config_class for m in METHODS}


__all__ = ["METHODS", "AdapterMethod", "AdapterPlan", "Entry", "MethodEnv", "method_for", "config_classes"]
