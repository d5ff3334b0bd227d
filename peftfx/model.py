"""PeftFxModel: the thin facade users hold, with PEFT's PeftModel API.

It wraps the user's model and delegates every decision to its `state` (peftfx/state/model_state.py),
the one owner of adapters, captures and the choice of graph per call. Attribute access falls through
to the wrapped model, as PEFT's PeftModel does.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Optional, Sequence, Union, cast

import torch
from torch import fx, nn

from . import io, trainer_support
from .capture import BACKBONE
from .config import AdapterConfig, as_peftfx_config
from .errors import ConfigError
from .state.model_state import ModelState, check_adapter_name, hf_example_inputs  # noqa: F401 - public names
from .state.store import AdapterStore
from .state.variants import VariantSpec

DEFAULT_ADAPTER = "default"


# Base-model attributes the fall-through would reach and that would do the wrong thing on the wrapper,
# with what to do instead (the implemented ones are methods of PeftFxModel; docs/migration.md lists both).
REFUSED = {
    "enable_adapters": "transformers' own adapter switch does not see peftfx adapters; use set_adapter(), or "
    "the disable_adapter() context manager to run without them.",
    "disable_adapters": "transformers' own adapter switch does not see peftfx adapters; use the "
    "disable_adapter() context manager.",
    "dequantize": "it would replace the quantized layers under peftfx's graphs; use "
    "merge_and_unload(dequantize=True), or unload() and dequantize the model handed back.",
    "set_decoder": "it replaces the decoder under peftfx's graphs; set it before peftfx.apply.",
}
# save_pretrained arguments of PEFT's and transformers' that change nothing in what peftfx writes.
# (Adapters are one small file; embedding layers are never trained by peftfx adapters yet, see #19.)
IGNORED_SAVE_OPTIONS = {"max_shard_size", "save_embedding_layers"}

_FACADES: dict[type, type] = {}


def facade_class(base_class: type) -> type:
    """The PeftFxModel subclass for a wrapped model class: its `forward` has the wrapped class's signature,
    as PEFT's task classes (PeftModelForCausalLM, ...) spell theirs out. transformers reads the class's forward
    for label names (`find_labels(model.__class__)`: eval_loss, compute_metrics' labels) and for the dataset
    columns it keeps, and its name keeps the wrapped one's (`"QuestionAnswering" in name` picks QA labels).
    A class, not a per-instance closure, so copy.deepcopy and pickle give independent models."""
    cls = _FACADES.get(base_class)
    if cls is None:

        def forward(self: PeftFxModel, *args: Any, **kwargs: Any) -> Any:
            return self._run(*args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(base_class.forward)  # type: ignore[attr-defined]
        except (TypeError, ValueError):  # a forward inspect cannot read: keep (*args, **kwargs)
            pass
        forward.__doc__ = PeftFxModel._run.__doc__
        name = f"PeftFx{base_class.__name__}"
        cls = type(name, (PeftFxModel,), {"forward": forward, "__module__": __name__, "__qualname__": name})
        _FACADES[base_class] = cls
    return cls


def _new_facade(base_class: type) -> "PeftFxModel":
    """pickle's constructor of a PeftFxModel (the facade class is made at run time, so it is not importable)."""
    return cast(PeftFxModel, nn.Module.__new__(facade_class(base_class)))


class PeftFxModel(nn.Module):
    """A model with adapters. Calls run the active variant graph and return the model's own output.

    `PeftFxModel(model)` makes an instance of `facade_class(type(model))`, so `isinstance(pm, PeftFxModel)`
    holds and `type(pm).forward` carries the wrapped model's signature."""

    # transformers' marker for "adapters are attached" (its own PEFT integration sets it on a model):
    # Trainer's quantized-model check reads it, so a 4-bit base with peftfx adapters trains.
    _hf_peft_config_loaded = True

    def __new__(cls, model: nn.Module, *args: Any, **kwargs: Any) -> "PeftFxModel":
        if cls is PeftFxModel:
            cls = facade_class(type(model))
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Optional[Any] = None,
        dynamic_axes: Optional[dict[str, dict[int, str]]] = None,
    ):
        super().__init__()
        self._modules["base_model"] = model  # pm.base_model is a BaseModelView over it (the property wins)
        self.adapters = AdapterStore()
        self.training = model.training
        self.__dict__["state"] = ModelState(model, self.adapters, example_inputs, dynamic_axes)
        trainer_support.install()

    state: ModelState

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Rebuilt through facade_class; the rest is the instance dict (ModelState drops its caches).
        return (_new_facade, (type(self._modules["base_model"]),), self.__dict__.copy())

    # -- attribute access falls through to the wrapped model, as PEFT's PeftModel does --------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "adapters", "_modules", "state") or name.startswith("__"):
                raise
            if name in REFUSED:
                raise AttributeError(f"PeftFxModel.{name}: {REFUSED[name]}") from None
            return getattr(self._modules["base_model"], name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' GenerationMixin.generate driving peftfx's static-KV-cache decode graph with the
        active adapters (peftfx/generate.py): its arguments (beam search, logits processors, streamers,
        generation_config, ...) and its result (a tensor, or a GenerateOutput with
        return_dict_in_generate), plus PEFT's adapter_names for a mixed batch and `seed`."""
        from .generate import generate

        return generate(self, *args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped model itself (PEFT's name)."""
        return cast(nn.Module, self._modules["base_model"])

    @property
    def base_model(self) -> "BaseModelView":
        """The wrapped model; calling it runs the adapted backbone (transformers' `base_model`, the model
        without its head), which TRL's fused LM-head loss calls. See BaseModelView."""
        return BaseModelView(self)

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
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[Sequence[str]] = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Merge and hand back the user's own model, with the active adapters' saved modules copied in.
        It needs no peftfx to run or to save (transformers' save_pretrained writes a plain checkpoint).
        On a quantized base the model comes back with bitsandbytes layers holding the requantized merged
        weights, or, with `dequantize=True`, in full precision (merged exactly, no requantization).
        A merge over 2 s shows a progress bar whatever `progressbar` (PEFT's argument, accepted) says;
        `peftfx.progress.disable_progress_bars()` turns bars off."""
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

    def _run_backbone(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The backbone's output (last_hidden_state, ...) with the active adapters."""
        run, named = self.state.runner(args, kwargs, adapter_names, self.training, BACKBONE)
        return run(**named)

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

    # -- base-model methods that would do the wrong thing through the fall-through (docs/migration.md) --

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' count over the model with its adapters (through the fall-through it counted the
        base only, with 0 trainable)."""
        embeddings = set()
        if exclude_embeddings:
            embeddings = {id(m.weight) for m in self.get_base_model().modules() if isinstance(m, nn.Embedding)}
        return sum(
            p.numel() for p in self.parameters() if (p.requires_grad or not only_trainable) and id(p) not in embeddings
        )

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of the parameters (and buffers) of the model and its adapters."""
        total = sum(p.nelement() * p.element_size() for p in self.parameters())
        if return_buffers:
            total += sum(b.nelement() * b.element_size() for b in self.buffers())
        return total

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Module:
        """transformers' resize of the base model; the graphs are captured again on the next call. Refused
        before anything changes when an adapter or saved module sits on the embeddings or the head (its
        tensors have the old vocabulary size): resize before peftfx.apply, as with PEFT."""
        state = self.state
        with state.lock:
            on_them = state.adapters_on()
            if on_them:
                raise ConfigError(
                    f"resize_token_embeddings: adapters {on_them} sit on the embeddings or the output head, "
                    "whose shapes would change; resize the base model before peftfx.apply (then add the "
                    "adapter), or delete those adapters first. Nothing was changed."
                )
            result = self.get_base_model().resize_token_embeddings(*args, **kwargs)  # type: ignore[operator]
            state.check_base()  # new embedding tensors: capture again on the next call
            return cast(nn.Module, result)

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """transformers' switch (Trainer's gradient_checkpointing=True calls it), set on the wrapped model:
        each layer's block call then runs under the checkpoint function transformers keeps on the layer
        (use_reentrant, every_n_layers, offload), as the layer's own forward would."""
        self._set_checkpointing("activation_checkpointing_enable", args, kwargs)

    def activation_checkpointing_disable(self) -> None:
        self._set_checkpointing("activation_checkpointing_disable", (), {})

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """transformers' older name of activation_checkpointing_enable (gradient_checkpointing_kwargs=...)."""
        self._set_checkpointing("gradient_checkpointing_enable", args, kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self._set_checkpointing("gradient_checkpointing_disable", (), {})

    def _set_checkpointing(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """transformers sets its per-layer switches; block calls read them at call time, so no graph
        changes (peftfx/checkpointing.py)."""
        getattr(self.get_base_model(), method)(*args, **kwargs)

    def checkpointing(
        self,
        policy: Optional[str] = "full",
        every: Optional[int] = None,
        memory_budget: Optional[float] = None,
        use_reentrant: bool = False,
    ) -> None:
        """peftfx's activation checkpointing, in place of transformers' switches: "full", "selective"
        (saves matmul and attention outputs, recomputes the rest), "every" (every=k), "budget"
        (memory_budget=share of activations kept) or "off"; None goes back to transformers' switches.
        See peftfx/checkpointing.py POLICIES."""
        self.state.variants.checkpointing.set(policy, every, memory_budget, use_reentrant)
        base = self.get_base_model()
        if policy not in (None, "off") and callable(getattr(base, "enable_input_require_grads", None)):
            # as transformers' own switch does for a model with adapters: reentrant checkpointing of the first
            # layer needs an input that requires grad, or the adapters inside get no gradient
            base.enable_input_require_grads()  # type: ignore[operator]

    def checkpointing_policy(self) -> dict[str, Any]:
        """The policy `checkpointing` set (policy None: transformers' per-layer switches decide)."""
        settings = self.state.variants.checkpointing
        return {
            "policy": settings.policy,
            "every": settings.every if settings.policy == "every" else None,
            "memory_budget": settings.memory_budget,
            "use_reentrant": settings.use_reentrant,
        }

    def block_calls(self, **inputs: Any) -> dict[str, Any]:
        """The blocks (`peftfx.blocks.BlockCall`, by module path) that run the graph `graph_module` shows:
        each holds its block GraphModule (`.graph_module`) and runs through the user's module."""
        with self.state.lock:
            named = self.state.capturer.prepare_inputs((), inputs) if inputs else None
            gm = self.state.graph_for(named, training=self.training)
            return self.state.variants.block_calls(gm)

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
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        is_main_process: bool = True,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
        **kwargs: Any,
    ) -> None:
        """Write the adapters in PEFT's format (PEFT's arguments; Trainer passes is_main_process and
        state_dict). `state_dict` (a gathered pm.state_dict(), as FSDP and DeepSpeed give) is refused
        for now: the adapters are written from the model's own tensors."""
        unknown = sorted(set(kwargs) - IGNORED_SAVE_OPTIONS)
        if unknown:
            raise ConfigError(
                f"save_pretrained got unknown arguments {unknown}; peftfx takes PEFT's save_directory, "
                f"safe_serialization, selected_adapters, is_main_process and {sorted(IGNORED_SAVE_OPTIONS)}."
            )
        if state_dict is not None:
            raise ConfigError(
                "save_pretrained(state_dict=...) is not supported yet (a sharded model's gathered state "
                "dict); peftfx writes the adapters from the model's own tensors: call it without state_dict."
            )
        if kwargs.get("save_embedding_layers") is True:
            raise ConfigError(
                "save_embedding_layers=True: peftfx adapters do not change the embedding layers, so there is "
                "nothing more to write; leave it at 'auto'."
            )
        if not is_main_process:
            if io.store_is_sharded(self.state.env):  # FSDP2: every rank takes part in gathering the shards
                io.gather_adapters(self.state.env, selected_adapters)
            return
        io.save_adapters(self.state.env, save_directory, selected_adapters, safe_serialization)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> "PeftFxModel":
        """PEFT's `PeftModel.from_pretrained(model, model_id, ...)`: `peftfx.load`."""
        from .api import load

        return load(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)

    # -- hub (peftfx/hub.py) ---------------------------------------------------------------------------

    def load_adapter(
        self,
        model_id: str,
        adapter_name: str,
        is_trainable: bool = False,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        **hub_kwargs: Any,
    ) -> None:
        """Read a PEFT-format adapter (a folder or hub repo id) and add it (validated before anything changes).
        `hub_kwargs` are PEFT's download arguments (cache_dir, token, local_files_only, force_download, ...)."""
        config, weights, weights_path = io.read_adapter(model_id, subfolder, revision, **hub_kwargs)
        # PEFT saves the base embedding (a tied lm_head's too) when an adapter targets one: a base weight
        weights, embeddings = io.split_embedding_copies(self.state.env, weights)
        if adapter_name in self.adapters.configs:
            # PEFT: the weights go into the existing adapter (Trainer's resume and load_best_model_at_end)
            self.state.load_weights(adapter_name, weights, source=weights_path)
            io.copy_embeddings(self.state.env, embeddings)
            if not is_trainable:
                self.eval()
            return
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, weights=weights, source=weights_path)
        io.copy_embeddings(self.state.env, embeddings)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[Union[str, bool]] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        selected_adapters: Optional[list[str]] = None,
        commit_description: Optional[str] = None,
        tags: Optional[list[str]] = None,
        **kwargs: Any,
    ) -> Any:
        """Upload the adapters (not the base model) to a hub repo as PEFT does: adapter_config.json,
        adapter_model.safetensors and a model card naming the base model (peftfx/hub.py)."""
        from . import hub

        ignored = {"max_shard_size", "safe_serialization"}
        unknown = sorted(set(kwargs) - ignored)
        if unknown:
            raise ConfigError(
                f"push_to_hub() got unknown keyword argument(s) {unknown}; it takes commit_message, private, "
                "token, revision, create_pr, selected_adapters, commit_description and tags."
            )
        return hub.push_to_hub(
            self.state.env,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            selected_adapters=selected_adapters,
            tags=tags,
        )


class BaseModelView:
    """`pm.base_model`: the wrapped model for every attribute (`pm.base_model.config`, `.named_parameters()`,
    `.lm_head`, ...), as in PEFT, where it reaches the model underneath. Calling it runs the *adapted*
    backbone and returns the backbone's output (`last_hidden_state`): transformers' `model.base_model(...)`
    is the model without its head, and TRL's SFTTrainer scores tokens from it with its own fused LM head.
    The plain wrapped module is `pm.get_base_model()`."""

    __slots__ = ("_pm",)
    _pm: PeftFxModel

    def __init__(self, pm: PeftFxModel):
        object.__setattr__(self, "_pm", pm)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._pm._run_backbone(*args, **kwargs)

    @property
    def model(self) -> nn.Module:
        """The wrapped model, as PEFT's `pm.base_model.model`."""
        return self._pm.get_base_model()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pm.get_base_model(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._pm.get_base_model(), name, value)

    def __dir__(self) -> list[str]:
        return dir(self._pm.get_base_model())

    def __repr__(self) -> str:
        return repr(self._pm.get_base_model())
