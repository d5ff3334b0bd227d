"""The base of every adapter config: PEFT's shared fields, the peft_type check and the registry that
turns adapter_config.json back into a config.

A method's config class subclasses `AdapterConfig`, sets `PEFT_TYPE` and is decorated with
`@register_config`; `config_from_dict` and `as_peftfx_config` then know it, so adapter_config.json
files and `peft` config objects of that type load without further changes.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, TypeVar

from ..errors import ConfigError

PEFTFX_VERSION_KEY = "peftfx_version"

# PEFT adds these heads to modules_to_save for classification tasks.
TASK_HEADS: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields every PEFT config has (PeftConfig's), with PEFT's defaults."""

    PEFT_TYPE: ClassVar[str] = ""

    modules_to_save: Optional[list[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_type: Optional[str] = None
    auto_mapping: Optional[dict[str, Any]] = None  # PEFT's bookkeeping fields: carried through, no behaviour
    peft_version: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.task_type, enum.Enum):
            self.task_type = self.task_type.value
        self.peft_type = getattr(self.peft_type, "value", self.peft_type)
        if self.peft_type in ("", None):  # PEFT's dataclass default; its __post_init__ fills it in too
            self.peft_type = self.PEFT_TYPE
        if self.peft_type != self.PEFT_TYPE:
            raise ConfigError(f"{type(self).__name__} got peft_type={self.peft_type!r}; expected {self.PEFT_TYPE!r}.")
        self.validate()

    def validate(self) -> None:
        """Refuse values PEFT would refuse or that have no meaning, with the fix in the message."""
        if not isinstance(self.inference_mode, bool):
            raise ConfigError(
                f"{type(self).__name__}.inference_mode must be True or False, got {self.inference_mode!r}."
            )

    def resolved_modules_to_save(self) -> list[str]:
        """modules_to_save plus the task head PEFT adds for classification tasks."""
        names = list(dict.fromkeys(self.modules_to_save or []))
        return names + [h for h in TASK_HEADS.get(self.task_type or "", []) if h not in names]

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, as PEFT writes it."""
        return dict(sorted(dataclasses.asdict(self).items()))


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {}
_C = TypeVar("_C", bound=type)


def register_config(cls: _C) -> _C:
    """Make a config class known by its PEFT_TYPE (adapter_config.json's `peft_type`)."""
    CONFIG_CLASSES[cls.PEFT_TYPE] = cls  # type: ignore[attr-defined]
    return cls


def config_from_dict(data: dict[str, Any], source: str = "config") -> AdapterConfig:
    """Build a config from adapter_config.json content; unknown keys and unsupported values are errors."""
    data = dict(data)
    peft_type = data.get("peft_type", "LORA")
    peft_type = getattr(peft_type, "value", peft_type)
    cls = CONFIG_CLASSES.get(peft_type)
    if cls is None:
        raise ConfigError(
            f"{source}: peft_type {peft_type!r} is not supported yet; supported: {sorted(CONFIG_CLASSES)}."
        )
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        if key in known:
            kwargs[key] = getattr(value, "value", value)
        elif key == PEFTFX_VERSION_KEY:
            continue
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(
            f"{source}: unknown config keys {sorted(unknown)} for {cls.__name__}; "
            f"known keys are {sorted(known)} (check for typos)."
        )
    for key in ("target_modules", "feedforward_modules", "exclude_modules"):
        if isinstance(kwargs.get(key), (set, tuple)):
            kwargs[key] = sorted(kwargs[key])
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def as_peftfx_config(config: Any) -> AdapterConfig:
    """Accept a peftfx config, the matching `peft` config object or a plain dict."""
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict) and hasattr(config, "peft_type"):
        return config_from_dict(to_dict(), source=type(config).__name__)
    names = ", ".join(cls.__name__ for cls in CONFIG_CLASSES.values())
    raise ConfigError(
        f"Expected a peftfx config ({names}), the same peft config, or a dict; got {type(config).__name__}."
    )
