"""transformers' Trainer (and TRL's trainers, which subclass it) treat a PeftFxModel as an adapter model.

Trainer decides "is this an adapter model?" in two places, both by `isinstance(model, peft.PeftModel)`:
`_is_peft_model` (label names, resume_from_checkpoint and load_best_model_at_end load the adapter with
`model.load_adapter`, the quantized-model check) and `Trainer._save` (a PreTrainedModel or PeftModel is saved
with `save_pretrained`; anything else as its whole state dict in model.safetensors, which also fails on tied
embeddings). peftfx cannot pass those checks without subclassing peft's classes (peft is not a run-time
dependency), so it widens the two checks, and only them, to include PeftFxModel: the rest of Trainer's
adapter-model code is duck-typed (`get_base_model`, `active_adapters`, `load_adapter`, `peft_config`), and
PeftFxModel has PEFT's names for all of it. Checkpoints are then PEFT adapters that PEFT loads.

The widening is installed when a PeftFxModel is made if transformers.trainer is imported already, else when it
is first imported (transformers.trainer takes seconds to import, so peftfx does not import it itself).
docs/migration.md lists it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any, Callable, Optional, Sequence, cast

TRAINER = "transformers.trainer"
# Modules that bound transformers.trainer_utils._is_peft_model to a name of their own at import.
PREDICATE_HOLDERS = ("transformers.trainer_utils", "transformers.trainer", "transformers.integrations.neftune")
_MARK = "__peftfx_widened__"


def _is_peftfx(model: Any) -> bool:
    from .model import PeftFxModel

    return isinstance(model, PeftFxModel)


def _widen_predicate(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    if getattr(original, _MARK, False):
        return original

    def is_adapter_model(model: Any) -> bool:
        return _is_peftfx(model) or original(model)

    setattr(is_adapter_model, _MARK, True)
    is_adapter_model.__doc__ = original.__doc__
    return is_adapter_model


def _widen_save(original: Callable[..., None]) -> Callable[..., None]:
    if getattr(original, _MARK, False):
        return original

    def _save(self: Any, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not _is_peftfx(model):
            return original(self, output_dir, state_dict)
        # What Trainer._save does for a PeftModel: the adapter through save_pretrained, then the tokenizer
        # or processor and the training arguments.
        import torch
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict)
        processor = self.processing_class
        if processor is None:
            processor = getattr(self.data_collator, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    setattr(_save, _MARK, True)
    return _save


def _install_into_loaded() -> None:
    for name in PREDICATE_HOLDERS:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "_is_peft_model"):
            module._is_peft_model = _widen_predicate(module._is_peft_model)  # type: ignore[attr-defined]
    trainer_module = sys.modules.get(TRAINER)
    if trainer_module is not None:
        trainer = trainer_module.Trainer
        trainer._save = _widen_save(trainer._save)


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    """Widens the checks right after transformers.trainer is imported (it imports the other holders)."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None) -> Any:
        if fullname != TRAINER:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the widening."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return cast(Optional[ModuleType], self._loader.create_module(spec))

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _install_into_loaded()


def install() -> None:
    """Widen Trainer's adapter-model checks now (transformers.trainer imported) or on its import."""
    if TRAINER in sys.modules:
        _install_into_loaded()
    elif not any(isinstance(f, _TrainerImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TrainerImportHook())
