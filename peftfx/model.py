"""PeftFxModel: the user's model, its adapters, and the variant graph that runs for each call."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import threading
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar, Union

import torch
from torch import fx, nn

from peftfx.passes import merge as merge_pass

from .adapters import AdapterStore
from .capture import Capture, Capturer
from .code_cache import scratch_code
from .combine import combine_site, combined_rank
from .config import AdapterConfig, as_peftfx_config
from .errors import CheckpointError, ConfigError
from .bnb_capture import adopt_bnb_modules, to_bnb_modules
from .plan import AdapterPlan, commit_plan, existing_plan, make_plan, modules_to_save_paths
from .prompt_config import PromptLearningConfig, fill_from_model
from .state import BASE_ROW, VariantCache, VariantSpec
from .virtual_tokens import PROMPT_HEAD_PREFIX, PROMPT_KEY, capture_inputs, check_task, make_prompt_module, user_inputs

DEFAULT_ADAPTER = "default"
_F = TypeVar("_F", bound=Callable[..., Any])


def _locked(method: _F) -> _F:
    """Run a state change under the model's lock: concurrent set/add/delete/merge/unmerge calls run one
    after another instead of interleaving (two unlocked merges could both fold the same delta in)."""
    @functools.wraps(method)
    def run(self: "PeftFxModel", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return run  # type: ignore[return-value]


def check_adapter_name(adapter_name: Any) -> None:
    """Adapter names are names, not paths: save_pretrained writes `<folder>/<name>/`, so a name must not
    be able to point anywhere else."""
    if not isinstance(adapter_name, str):
        raise ConfigError(f"adapter name must be a str, got {type(adapter_name).__name__} {adapter_name!r}.")
    problem = ("is empty" if not adapter_name else
               "contains a NUL byte" if "\0" in adapter_name else
               "is a path" if os.path.isabs(adapter_name) or "/" in adapter_name or "\\" in adapter_name else
               "contains '.'" if "." in adapter_name else
               "is reserved for rows without adapter" if adapter_name == BASE_ROW else None)
    if problem is not None:
        raise ConfigError(f"adapter name {adapter_name!r} {problem}; an adapter name is a plain name such as "
                          "'default' or 'task_b' (no '.', '/', '\\' or NUL, not empty, not '__base__').")


class PeftFxModel(nn.Module):
    """A model with adapters. Calls run the active variant graph and return the model's own output."""

    def __init__(self, model: nn.Module, example_inputs: Optional[dict[str, Any]] = None,
                 dynamic_axes: Optional[dict[str, dict[int, str]]] = None):
        super().__init__()
        self.base_model = model
        self.adapters = AdapterStore()
        self._capturer = Capturer(model, dynamic_axes)
        self._variants = VariantCache()
        self._example_inputs = example_inputs
        self._active: list[str] = []
        self._merged: list[str] = []
        self._disabled = False
        self._last_capture: Optional[Capture] = None
        self.training = model.training
        self._lock = threading.RLock()  # state changes and variant lookups (see docs/concepts.md, threads)
        self.quant = adopt_bnb_modules(model)  # a QuantStore when the model holds bitsandbytes layers
        self._variants.quant = self.quant
        forward_signature = inspect.signature(model.forward)

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._run(*args, **kwargs)

        # Expose the wrapped model's signature: transformers.Trainer reads it to keep dataset columns.
        forward.__signature__ = forward_signature
        forward.__doc__ = self._run.__doc__
        self.forward = forward

    # -- attribute access falls through to the wrapped model, as PEFT's PeftModel does --------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "adapters", "_modules"):
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
        return list(self._active)

    @property
    def active_adapter(self) -> Optional[str]:
        return self._active[0] if self._active else None

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    # -- adapters -----------------------------------------------------------------------------------

    @_locked
    def add_adapter(self, adapter_name: str, peft_config: Any,
                    weights: Optional[dict[str, torch.Tensor]] = None, source: str = "weights") -> None:
        """Add an adapter (active only if it is the first, as in PEFT). `weights`, a PEFT-format state
        dict, are checked against the plan before anything changes: a bad checkpoint changes nothing."""
        from .io import check_weights, copy_weights, plan_entries
        config = as_peftfx_config(peft_config)
        self._check_new_name(adapter_name)
        self._check_same_kind(config)
        if isinstance(config, PromptLearningConfig):
            with self._rollback_on_failure(adapter_name):
                return self._add_prompt_adapter(adapter_name, config, weights, source)
        plan = self._plan(adapter_name, config)
        entries = plan_entries(self, plan)
        matched = check_weights(entries, weights, source) if weights is not None else None
        first = not self._active
        with self._rollback_on_failure(adapter_name):
            commit_plan(self.base_model, self.adapters, plan, trainable=first and not config.inference_mode)
            self.adapters.kinds[adapter_name] = config.peft_type
            if matched is not None:
                copy_weights(self, entries, matched)
            if first:
                self._active = [adapter_name]

    def _plan(self, adapter_name: str, config: AdapterConfig) -> AdapterPlan:
        """The adapter's plan, from a scratch copy of the reference graph (its generated code released)."""
        with scratch_code():
            return make_plan(self._reference_capture().fresh_module(), self.base_model, adapter_name, config)

    @contextlib.contextmanager
    def _rollback_on_failure(self, adapter_name: str) -> Iterator[None]:
        """Undo a half-done add on any exception (Ctrl-C included): the adapter's tensors and facts go,
        the base parameters get back their requires_grad flags and the active adapters stay as they were."""
        flags = [(p, p.requires_grad) for p in self.base_model.parameters()]
        active = list(self._active)
        try:
            yield
        except BaseException:
            self.adapters.delete(adapter_name)
            for p, flag in flags:
                p.requires_grad_(flag)
            self._active = active
            raise

    def _check_same_kind(self, config: AdapterConfig) -> None:
        kinds = set(self.adapters.kinds.values())
        if kinds and kinds != {config.peft_type}:
            raise ConfigError(f"cannot add a {config.peft_type} adapter to a model holding {sorted(kinds)} adapters "
                              "(PEFT refuses mixing adapter types too); use a separate peftfx.apply.")

    def _add_prompt_adapter(self, adapter_name: str, config: PromptLearningConfig,
                            weights: Optional[dict[str, torch.Tensor]], source: str) -> None:
        """Prompt or prefix tuning: one tensor of virtual tokens (PEFT's `prompt_embeddings`)."""
        check_task(config)
        config = fill_from_model(config, self.base_model)
        if weights is not None and getattr(config, "prefix_projection", False):
            # the file holds the projected prefix; the MLP that made it is not saved (as in PEFT)
            config = dataclasses.replace(config, inference_mode=True)
        module = make_prompt_module(config, self.base_model)
        saved_paths = modules_to_save_paths(self.base_model, config)
        if weights is not None:
            heads = {f"{PROMPT_HEAD_PREFIX}{path}.{name}": tuple(t.shape) for path in saved_paths
                     for name, t in self.base_model.get_submodule(path).state_dict().items()}
            tensor = _prompt_tensor(weights, tuple(module.saved_embeddings().shape), heads, source)
            with torch.no_grad():
                module.embedding.weight.copy_(tensor.to(module.embedding.weight.dtype))
        first = not self._active
        if not self.adapters.configs:
            for p in self.base_model.parameters():
                p.requires_grad_(False)
        for path in saved_paths:
            clone = self.adapters.add_saved_module(adapter_name, path, self.base_model.get_submodule(path))
            if weights is not None:
                with torch.no_grad():
                    for name, t in clone.state_dict(keep_vars=True).items():
                        t.copy_(weights[f"{PROMPT_HEAD_PREFIX}{path}.{name}"])
        self.adapters.add_prompt(adapter_name, module)
        self.adapters.configs[adapter_name] = config
        self.adapters.kinds[adapter_name] = config.peft_type
        self.adapters.set_trainable(adapter_name, first and not config.inference_mode)
        if first:
            self._active = [adapter_name]

    def _check_new_name(self, adapter_name: str) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.adapters.configs:
            raise ConfigError(f"an adapter named {adapter_name!r} exists already; pick another name "
                              "or delete_adapter() it first.")

    def _check_lora_only(self, names: Sequence[str], what: str) -> None:
        prompts = [n for n in names if n in self.adapters.prompts]
        if prompts:
            raise ConfigError(f"prompt-learning adapters {prompts} cannot be {what} (only LoRA adapters can, "
                              "as in PEFT).")

    def adapter_plan(self, adapter_name: str) -> AdapterPlan:
        """The plan an existing adapter was built from (what save_pretrained writes)."""
        return existing_plan(self.adapters, adapter_name)

    def _check_known(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.adapters.configs]
        if missing:
            raise ConfigError(f"unknown adapter(s) {missing}; loaded adapters: {self.adapters.adapter_names()}.")

    @_locked
    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Activate one adapter, or several whose outputs are summed (PEFT's LoraModel.set_adapter).
        Inactive adapters are frozen; active ones become trainable unless loaded for inference."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ConfigError("set_adapter([]) names no adapter; give one or more of "
                              f"{self.adapters.adapter_names()}, or use `with pm.disable_adapter():` for the base model.")
        self._check_known(names)
        if len(names) > 1 and any(n in self.adapters.prompts for n in names):
            raise ConfigError(f"prompt-learning adapters run one at a time; set_adapter one of {names}.")
        if self._merged and names != self._active:
            warnings.warn(f"adapters {self._merged} are merged; set_adapter does not unmerge them "
                          "(call unmerge_adapter() first).", stacklevel=2)
        for name in self.adapters.adapter_names():
            if not self.adapters.configs[name].inference_mode:
                self.adapters.set_trainable(name, name in names)
        self._active = names

    @_locked
    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the remaining active ones (or the first left) take over."""
        self._check_known([adapter_name])
        if adapter_name in self._merged:
            raise ConfigError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it.")
        self.adapters.delete(adapter_name)
        if adapter_name in self._active:
            rest = [n for n in self._active if n != adapter_name] or self.adapters.adapter_names()[:1]
            self._active = []
            if rest:
                self.set_adapter(rest)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the untouched base graph inside the block (merged adapters are unmerged first, as in PEFT)."""
        with self._lock:
            if self._merged:
                self.unmerge_adapter()
            previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            with self._lock:
                self._disabled = previous

    @_locked
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None) -> None:
        """A new adapter combining others (PEFT's formulas for 'linear', 'cat' and 'svd'); inactive."""
        if adapter_name in self.adapters.configs:
            return  # PEFT returns silently when the name exists
        if not adapters:
            raise ConfigError("add_weighted_adapter got no adapters to combine; pass the names of existing "
                              f"adapters ({self.adapters.adapter_names()}) and one weight each.")
        if len(adapters) != len(weights):
            raise ConfigError(f"got {len(adapters)} adapters but {len(weights)} weights; give one weight each.")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        self._check_known(list(adapters))
        self._check_lora_only(list(adapters), "combined")
        shared = sorted(p for p in {p for a in adapters for p in self.adapters.saved.get(a, {})}
                        if sum(p in self.adapters.saved.get(a, {}) for a in adapters) > 1)
        if shared:
            raise ConfigError(f"adapters {adapters} each save module(s) {shared} (modules_to_save); trained "
                              "copies of one module cannot be combined. Combine adapters that save different "
                              "modules, or none.")
        rank = combined_rank(self.adapters, adapters, combination_type, svd_rank)
        first = self.adapters.configs[adapters[0]]
        targets = [self.adapters.configs[a].target_modules for a in adapters]
        if len({type(t) for t in targets}) > 1:
            raise ConfigError("cannot combine adapters whose target_modules mix lists and regex strings.")
        union = ("|".join(f"({t})" for t in targets) if isinstance(targets[0], str)
                 else sorted(set().union(*[set(t or []) for t in targets])) or None)
        config = dataclasses.replace(first, r=rank, lora_alpha=rank, target_modules=union, alpha_pattern={},
                                     rank_pattern={}, init_lora_weights=True, inference_mode=True)
        options = dict(svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)
        self._check_new_name(adapter_name)
        plan = self._plan(adapter_name, config)
        combined = {s.key: combine_site(self.adapters, s.key, adapters, weights, combination_type, rank, options)
                    for s in plan.slots}
        with self._rollback_on_failure(adapter_name), torch.no_grad():
            commit_plan(self.base_model, self.adapters, plan, trainable=False)
            for key, ab in combined.items():
                a, b = self.adapters.lora_weights(adapter_name, key)
                a.zero_(), b.zero_()
                if ab is not None:
                    a.copy_(ab[0]), b.copy_(ab[1])

    # -- quantization ---------------------------------------------------------------------------------

    @_locked
    def quantize(self, config: Any) -> Any:
        """Store the base linears (all but the output head, by default) in bitsandbytes 4-bit or 8-bit
        form (a QuantConfig or a transformers BitsAndBytesConfig); their full-precision weights are freed.
        Returns a report with the bytes of those weights before and after."""
        from peftfx.passes.quantize import quantize_model
        if self.quant is not None:
            raise ConfigError("the base model is quantized already.")
        if self._merged:
            raise ConfigError(f"adapters {self._merged} are merged; unmerge_adapter() before quantizing.")
        keep = tuple(p for saved in self.adapters.saved.values() for p in saved)
        store, report = quantize_model(self._reference_capture().fresh_module(), self.base_model, config, keep)
        self.quant = self._variants.quant = store
        self._variants.clear()
        return report

    # -- merging --------------------------------------------------------------------------------------

    @_locked
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Fold the adapters (default: the active ones) into the base weights; calls then run the plain
        base graph. With safe_merge, NaN/Inf results are refused before any weight changes."""
        names = list(adapter_names) if adapter_names is not None else list(self._active)
        self._check_known(names)
        self._check_lora_only(names, "merged")
        todo = [n for n in names if n not in self._merged]
        if len(todo) < len(names):
            warnings.warn(f"already merged: {[n for n in names if n in self._merged]}", stacklevel=2)
        merge_pass.merge(self.base_model, self.adapters, todo, safe_merge=safe_merge, quant=self.quant)
        self._merged += todo

    @_locked
    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter again (the base weights return up to fp32 rounding)."""
        merge_pass.unmerge(self.base_model, self.adapters, self._merged, quant=self.quant)
        self._merged = []

    @_locked
    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None,
                         dequantize: bool = False) -> nn.Module:
        """Merge and hand back the user's own model, with the active adapters' saved modules copied in.
        It needs no peftfx to run or to save (transformers' save_pretrained writes a plain checkpoint).
        On a quantized base the model comes back with bitsandbytes layers holding the requantized merged
        weights, or, with `dequantize=True`, in full precision (merged exactly, no requantization)."""
        names = list(adapter_names) if adapter_names is not None else list(self._active)
        if dequantize:
            self._dequantize_base()
        self.merge_adapter([n for n in names if n not in self._merged], safe_merge=safe_merge)
        return self._hand_back(self._unload_saved_modules())

    @_locked
    def unload(self) -> nn.Module:
        """The user's model without any adapter. Unlike PEFT's unload, merged adapters are unmerged
        first, so the weights handed back are the original ones (docs/migration.md). A quantized base
        comes back with bitsandbytes layers."""
        if self._merged:
            self.unmerge_adapter()
        return self._hand_back(self.base_model)

    def _dequantize_base(self) -> None:
        """Full-precision weights back into the model; merged adapters are unmerged first and merged again
        in full precision."""
        if self.quant is None:
            return
        from peftfx.passes.quantize import dequantize_into_model
        merged = list(self._merged)
        if merged:
            self.unmerge_adapter()
        dequantize_into_model(self.base_model, self.quant)
        self.quant = self._variants.quant = None
        self._variants.clear()
        if merged:
            self.merge_adapter(merged)

    def _hand_back(self, model: nn.Module) -> nn.Module:
        """The user's model; hollow quantized weights become bitsandbytes layers (runnable without peftfx)."""
        if self.quant is not None:
            to_bnb_modules(model, self.quant)
            self.quant = self._variants.quant = None
            self._variants.clear()
            self._capturer.clear()
            self._last_capture = None
        return model

    def _unload_saved_modules(self) -> nn.Module:
        with torch.no_grad():
            for adapter in reversed(self._active):
                for path, clone in self.adapters.saved.get(adapter, {}).items():
                    original = self.base_model.get_submodule(path)
                    for (_, dst), (_, src) in zip(original.state_dict(keep_vars=True).items(),
                                                  clone.state_dict(keep_vars=True).items()):
                        dst.copy_(src)
        return self.base_model

    # -- running --------------------------------------------------------------------------------------

    def _reference_named(self) -> dict[str, Any]:
        """The user's example inputs, or ones made from the HF config, by name."""
        example = self._example_inputs
        if example is None:
            example = hf_example_inputs(self.base_model)
        args, kwargs = ((), dict(example)) if isinstance(example, dict) else (tuple(example), {})
        return self._capturer.prepare_inputs(args, kwargs)

    def _reference_capture(self) -> Capture:
        """The capture used to find targets (the last call's, else the reference inputs')."""
        if self._last_capture is None:
            self._last_capture = self._capturer.get(self._reference_named(), training=False)
        return self._last_capture

    def _prompt_adapter(self) -> Optional[str]:
        """The active prompt-learning adapter, unless adapters are disabled."""
        if self._disabled or not self._active or self._active[0] not in self.adapters.prompts:
            return None
        return self._active[0]

    def _prompt_capture(self, adapter: str, named: dict[str, Any],
                        training: bool) -> tuple[Capture, VariantSpec, dict]:
        """(capture, spec, inputs to call the variant with) of a prompt-learning adapter: the base graph is
        captured for the virtual tokens' sizes; the prompt/prefix pass rewrites it to take the user's inputs."""
        config = self.adapters.configs[adapter]
        named = user_inputs(config, named)
        source = "input_ids" if "input_ids" in named else "inputs_embeds"
        capture = self._capturer.get(capture_inputs(config, named, self.base_model), training)
        saved = (adapter,) if self.adapters.saved.get(adapter) else ()
        return capture, VariantSpec(prompt=(adapter, source), saved=saved, training=training), named

    def _prompt_variant(self, adapter: str, named: dict[str, Any]) -> tuple[fx.GraphModule, Any, dict]:
        """(graph, callable, inputs to call it with) of a prompt-learning adapter in the current mode."""
        capture, spec, named = self._prompt_capture(adapter, named, self.training)
        gm, run = self._variants.get(capture, self.base_model, self.adapters, spec)
        return gm, run, named

    def _run(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """Run the active variant; same arguments and output type as the wrapped model's forward.
        `adapter_names` (one name per batch row, or "__base__") runs a mixed batch in one graph.
        The variant is chosen (captured, built) under the model's lock and run outside it."""
        run, named = self._runner(args, kwargs, adapter_names)
        return run(**named)

    @torch.compiler.disable
    def _runner(self, args: tuple, kwargs: dict, adapter_names: Optional[Sequence[str]]) -> tuple[Callable, dict]:
        """(callable, the inputs to call it with) for this call, chosen under the model's lock.

        Never traced by dynamo (`torch.compile(pm)`, Trainer's `torch_compile`): this is Python
        bookkeeping over dicts of captures and variants, which dynamo specialises on; traced, a Trainer
        step made a new capture at every step. The variant it returns is what gets compiled."""
        with self._lock:
            return self._choose(args, kwargs, adapter_names)

    def _choose(self, args: tuple, kwargs: dict, adapter_names: Optional[Sequence[str]]) -> tuple[Callable, dict]:
        named = self._capturer.prepare_inputs(args, kwargs)
        prompt = self._prompt_adapter()
        if prompt is not None:
            if adapter_names is not None:
                raise ConfigError("adapter_names (mixed batches) works with LoRA adapters only.")
            _, run, named = self._prompt_variant(prompt, named)
            return run, named
        capture = self._capturer.get(named, self.training)
        self._last_capture = capture
        if adapter_names is None:
            return self._variant(capture)[1], named
        return self._mixed_runner(capture, adapter_names, named), named

    def _mixed_runner(self, capture: Capture, adapter_names: Sequence[str], named: dict) -> Callable:
        """The callable of a mixed batch, with its per-row adapter index bound. Disabled adapters win over
        adapter_names (PEFT), and a batch whose rows are all "__base__" runs the base graph."""
        spec, row_index = self._mixed_spec(adapter_names, named, capture)
        if self._disabled or not spec.mixed:
            return self._variants.get(capture, self.base_model, self.adapters, VariantSpec(training=False))[1]
        _, run = self._variants.get(capture, self.base_model, self.adapters, spec)
        return functools.partial(run, **{spec.row_input: row_index})

    def _variant(self, capture: Capture) -> tuple[fx.GraphModule, Any]:
        """(graph, callable) of the current state: a LoRA variant is keyed by the active adapters'
        layouts, and its slot bank is pointed at the active adapters themselves."""
        training = capture.signature.training
        if self._disabled:
            return self._variants.get(capture, self.base_model, self.adapters, VariantSpec(training=training))
        unmerged = tuple(a for a in self._active if a not in self._merged)
        saving = tuple(a for a in self._active if self.adapters.saved.get(a))
        spec = VariantSpec(lora=tuple(self.adapters.layout(a) for a in unmerged), saved=saving, training=training)
        return self._variants.get(capture, self.base_model, self.adapters, spec, bind=unmerged)

    def _mixed_spec(self, adapter_names: Sequence[str], named: dict, capture: Capture):
        if self.training:
            raise ConfigError("adapter_names (mixed-adapter batches) is for inference; call pm.eval() first.")
        if self._merged:
            raise ConfigError("adapter_names cannot be used while adapters are merged; unmerge_adapter() first.")
        rows = list(adapter_names)
        batch = next(v for v in named.values() if isinstance(v, torch.Tensor)).shape[0]
        if len(rows) != batch:
            raise ConfigError(f"adapter_names has {len(rows)} entries but the batch has {batch} rows.")
        names = tuple(sorted({r for r in rows if r != BASE_ROW}))
        self._check_known(list(names))
        saving = [n for n in names if self.adapters.saved.get(n)]
        if saving:
            raise ConfigError(f"adapters {saving} have modules_to_save; mixed batches support LoRA-only adapters.")
        spec = VariantSpec(mixed=names, training=False)
        position = {n: i for i, n in enumerate(names)}
        device = next(self.base_model.parameters()).device
        row_index = torch.tensor([position.get(r, len(names)) for r in rows], dtype=torch.long, device=device)
        return spec, row_index

    def variant_specs(self) -> list[VariantSpec]:
        """The specs of the variant graphs built and kept now, oldest first (what later calls reuse)."""
        return self._variants.specs()

    @property
    def graph_module(self) -> fx.GraphModule:
        """The active variant's GraphModule for the most recent call (or the reference inputs)."""
        prompt = self._prompt_adapter()
        if prompt is not None:
            return self._prompt_variant(prompt, self._reference_named())[0]
        return self._variant(self._reference_capture())[0]

    @property
    def fusion(self) -> bool:
        """Whether LoRA paths run fused (passes/fuse.py: one A matmul for adapters reading the same input,
        with one dropout mask; the scale folded into B). On by default; outputs and gradients equal the
        unfused paths within fp32 rounding. Setting it drops the built variants (rebuilt on the next call)."""
        return self._variants.fusion

    @fusion.setter
    @_locked
    def fusion(self, enabled: bool) -> None:
        if bool(enabled) != self._variants.fusion:
            self._variants.clear()
            self._variants.fusion = bool(enabled)

    @_locked
    def compile(self, **options: Any) -> "PeftFxModel":
        """Run every variant through torch.compile (once per variant, with `options`, default
        dynamic=True). Adapters of the same layout share a compiled variant: switching between them,
        or disabling and re-enabling, compiles nothing after each variant's first call."""
        self._variants.clear()
        self._variants.compile_options = {"dynamic": True, **options}
        return self

    def _apply(self, fn, recurse=True):
        # .to()/.half() replace buffers; captured graphs hold the old ones, so capture again lazily.
        result = super()._apply(fn, recurse)
        self._capturer.clear()
        self._variants.clear()
        self.adapters.version += 1
        self._last_capture = None
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
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def save_pretrained(self, save_directory: str, selected_adapters: Optional[list[str]] = None,
                        safe_serialization: bool = True, **kwargs: Any) -> None:
        from .io import save_adapters
        save_adapters(self, save_directory, selected_adapters, safe_serialization)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> None:
        from .io import load_adapter_into
        load_adapter_into(self, model_id, adapter_name, is_trainable=is_trainable, **kwargs)


def hf_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Token ids and a mask for a transformers model, from its config (no tokenizer, no download)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise ConfigError(
            f"cannot make example inputs for {type(model).__name__}; pass example_inputs="
            "{'name': tensor, ...} (or a tuple of positional tensors) to peftfx.apply.")
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _prompt_tensor(weights: dict[str, torch.Tensor], shape: tuple, heads: dict[str, tuple],
                   source: str) -> torch.Tensor:
    """A prompt-learning checkpoint: `prompt_embeddings` plus any saved heads, checked by name and shape."""
    wanted = {PROMPT_KEY: shape, **heads}
    if set(weights) != set(wanted):
        raise CheckpointError(f"{source}: a prompt-learning checkpoint for this model holds {sorted(wanted)}; "
                              f"found {sorted(weights)[:6]}. Is adapter_config.json from another adapter?")
    for key, need in wanted.items():
        if tuple(weights[key].shape) != need:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(weights[key].shape)} but the model "
                                  f"needs {need}; was it trained for another model or num_virtual_tokens?")
    return weights[PROMPT_KEY]
