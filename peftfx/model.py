"""PeftFxModel: the thin facade users hold, with PEFT's PeftModel API.

It wraps the user's model and delegates every decision to its `state` (peftfx/state/model_state.py),
the one owner of adapters, captures and the choice of graph per call. Attribute access falls through
to the wrapped model, as PEFT's PeftModel does.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import fx, nn

from . import io
from .config import AdapterConfig, as_peftfx_config
from .state.model_state import ModelState, check_adapter_name, hf_example_inputs  # noqa: F401 - public names
from .state.store import AdapterStore
from .state.variants import VariantSpec

DEFAULT_ADAPTER = "default"


class PeftFxModel(nn.Module):
    """A model with adapters. Calls run the active variant graph and return the model's own output."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Optional[Any] = None,
        dynamic_axes: Optional[dict[str, dict[int, str]]] = None,
    ):
        super().__init__()
        self.base_model = model
        self.adapters = AdapterStore()
        self.training = model.training
        self.__dict__["state"] = ModelState(model, self.adapters, example_inputs, dynamic_axes)
        forward_signature = inspect.signature(model.forward)

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._run(*args, **kwargs)

        # Expose the wrapped model's signature: transformers.Trainer reads it to keep dataset columns.
        forward.__signature__ = forward_signature  # type: ignore[attr-defined]
        forward.__doc__ = self._run.__doc__
        self.forward = forward

    state: ModelState

    # -- attribute access falls through to the wrapped model, as PEFT's PeftModel does --------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "adapters", "_modules", "state"):
                raise
            return getattr(self._modules["base_model"], name)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Decode with the active adapters through a static-KV-cache decode graph (peftfx/generate.py);
        arguments as transformers' generate: input_ids, attention_mask, max_new_tokens, do_sample,
        temperature, top_k, top_p, eos_token_id, pad_token_id (plus generator or seed), and PEFT's
        adapter_names for a mixed batch."""
        from .generate import generate

        return generate(self, *args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return self.adapters.configs

    @property
    def active_adapters(self) -> list[str]:
        return list(self.state.active)

    @property
    def active_adapter(self) -> Optional[str]:
        return self.state.active[0] if self.state.active else None

    @property
    def merged_adapters(self) -> list[str]:
        return list(self.state.merged)

    @property
    def quant(self) -> Any:
        """The QuantStore of a quantized base (None for a full-precision one)."""
        return self.state.quant

    # -- adapters -----------------------------------------------------------------------------------

    def add_adapter(
        self,
        adapter_name: str,
        peft_config: Any,
        weights: Optional[dict[str, torch.Tensor]] = None,
        source: str = "weights",
    ) -> None:
        """Add an adapter (active only if it is the first, as in PEFT). `weights`, a PEFT-format state
        dict, are checked against the plan before anything changes: a bad checkpoint changes nothing."""
        self.state.add_adapter(adapter_name, as_peftfx_config(peft_config), weights, source)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Activate one adapter, or several whose outputs are summed (PEFT's LoraModel.set_adapter).
        Inactive adapters are frozen; active ones become trainable unless loaded for inference."""
        self.state.set_adapter([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the remaining active ones (or the first left) take over."""
        self.state.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the untouched base graph inside the block (merged adapters are unmerged first, as in PEFT)."""
        state = self.state
        with state.lock:
            if state.merged:
                state.unmerge()
            previous, state.disabled = state.disabled, True
        try:
            yield
        finally:
            with state.lock:
                state.disabled = previous

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: Optional[int] = None,
        svd_clamp: Optional[float] = None,
        svd_full_matrices: bool = True,
        svd_driver: Optional[str] = None,
    ) -> None:
        """A new adapter combining others (PEFT's formulas for 'linear', 'cat' and 'svd'); inactive."""
        options = dict(svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)
        self.state.add_weighted_adapter(
            list(adapters), list(weights), adapter_name, combination_type, svd_rank, options
        )

    def adapter_plan(self, adapter_name: str) -> Any:
        """The plan an existing adapter was built from (what save_pretrained writes)."""
        return io.existing_plan(self.adapters, adapter_name)

    # -- quantization and merging -------------------------------------------------------------------

    def quantize(self, config: Any) -> Any:
        """Store the base linears (all but the output head, by default) in bitsandbytes 4-bit or 8-bit
        form (a QuantConfig or a transformers BitsAndBytesConfig); their full-precision weights are freed.
        Returns a report with the bytes of those weights before and after."""
        return self.state.quantize(config)

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Fold the adapters (default: the active ones) into the base weights; calls then run the plain
        base graph. With safe_merge, NaN/Inf results are refused before any weight changes."""
        self.state.merge(list(adapter_names) if adapter_names is not None else list(self.state.active), safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo every merge (the base weights return up to fp32 rounding)."""
        self.state.unmerge()

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None, dequantize: bool = False
    ) -> nn.Module:
        """Merge and hand back the user's own model, with the active adapters' saved modules copied in.
        It needs no peftfx to run or to save (transformers' save_pretrained writes a plain checkpoint).
        On a quantized base the model comes back with bitsandbytes layers holding the requantized merged
        weights, or, with `dequantize=True`, in full precision (merged exactly, no requantization)."""
        state = self.state
        with state.lock:
            names = list(adapter_names) if adapter_names is not None else list(state.active)
            if dequantize:
                state.dequantize()
            state.merge([n for n in names if n not in state.merged], safe_merge=safe_merge)
            state.copy_saved_modules_into_model()
            return state.hand_back()

    def unload(self) -> nn.Module:
        """The user's model without any adapter. Unlike PEFT's unload, merged adapters are unmerged
        first, so the weights handed back are the original ones (docs/migration.md). A quantized base
        comes back with bitsandbytes layers."""
        state = self.state
        with state.lock:
            if state.merged:
                state.unmerge()
            return state.hand_back()

    # -- running --------------------------------------------------------------------------------------

    def _run(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """Run the active variant; same arguments and output type as the wrapped model's forward.
        `adapter_names` (one name per batch row, or "__base__") runs a mixed batch in one graph.
        The variant is chosen (captured, built) under the state's lock and run outside it."""
        run, named = self._runner(args, kwargs, adapter_names)
        return run(**named)

    @torch.compiler.disable
    def _runner(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: Optional[Sequence[str]]
    ) -> tuple[Callable[..., Any], dict[str, Any]]:
        """Never traced by dynamo (`torch.compile(pm)`, Trainer's `torch_compile`): this is Python
        bookkeeping over dicts of captures and variants, which dynamo specialises on; traced, a Trainer
        step made a new capture at every step. The variant it returns is what gets compiled."""
        return self.state.runner(args, kwargs, adapter_names, self.training)

    def variant_specs(self) -> list[VariantSpec]:
        """The specs of the variant graphs built and kept now, oldest first (what later calls reuse)."""
        return self.state.variant_specs()

    @property
    def graph_module(self) -> fx.GraphModule:
        """The active variant's GraphModule for the most recent call (or the reference inputs)."""
        return self.state.graph_for(training=self.training)

    @property
    def fusion(self) -> bool:
        """Whether LoRA paths run fused (passes/fuse.py: one A matmul for adapters reading the same input,
        with one dropout mask; the scale folded into B). On by default; outputs and gradients equal the
        unfused paths within fp32 rounding. Setting it drops the built variants (rebuilt on the next call)."""
        return self.state.variants.fusion

    @fusion.setter
    def fusion(self, enabled: bool) -> None:
        self.state.set_fusion(enabled)

    def compile(self, **options: Any) -> "PeftFxModel":  # type: ignore[override]
        """Run every variant through torch.compile (once per variant, with `options`, default
        dynamic=True). Adapters of the same layout share a compiled variant: switching between them,
        or disabling and re-enabling, compiles nothing after each variant's first call."""
        self.state.set_compile(options)
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "PeftFxModel":
        # .to()/.half() replace buffers; captured graphs hold the old ones, so capture again lazily.
        result: PeftFxModel = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # unannotated in torch
        self.state.forget_captures()
        return result

    # -- counting and saving ------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def adapter_state_dict(self, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """An adapter's tensors under PEFT's checkpoint keys, on CPU: what save_pretrained writes."""
        self.state.check_known([adapter_name])
        return io.adapter_tensors(self.state.env, adapter_name)

    def save_pretrained(
        self,
        save_directory: str,
        selected_adapters: Optional[list[str]] = None,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> None:
        io.save_adapters(self.state.env, save_directory, selected_adapters, safe_serialization)

    def load_adapter(
        self,
        model_id: str,
        adapter_name: str,
        is_trainable: bool = False,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Read a PEFT-format adapter (a folder or hub repo id) and add it (validated before anything changes)."""
        config, weights, weights_path = io.read_adapter(model_id, subfolder, revision)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, weights=weights, source=weights_path)
