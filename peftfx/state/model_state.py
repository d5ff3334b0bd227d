"""The one owner of "which graph runs now": adapter state in, VariantSpec and GraphModule out.

`ModelState` holds what decides a call's graph: the active, merged and disabled adapters, the mode,
fusion and compile options, the quant store, and the captures and variant cache they index. It turns
that into a `VariantSpec` (`spec_for`) and the spec into a GraphModule (`variant`). PeftFxModel,
generate, export and the visualizer all ask it through these public methods; none of them builds a
spec or reads a capture cache of its own.

State changes (add, delete, set, merge, ...) run under one lock: concurrent calls run one after another
instead of interleaving (two unlocked merges could both fold the same delta in). Adding is
all-or-nothing: a method plans first (nothing changes), io checks a checkpoint against the plan, and
a failure while creating tensors undoes everything made so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar, cast

import torch
from torch import fx, nn

from .. import io, merge
from ..bnb_capture import adopt_bnb_modules, to_bnb_modules
from ..capture import FULL, Capture, Capturer
from ..code_cache import scratch_code
from ..config import AdapterConfig, LoraConfig
from ..errors import ConfigError
from ..loss import LOSS_INPUTS, WithLoss, outside_loss
from ..methods import AdapterPlan, MethodEnv, method_for
from .store import AdapterStore
from .variants import BASE_ROW, VariantCache, VariantSpec, build_variant

_F = TypeVar("_F", bound=Callable[..., Any])


def locked(method: _F) -> _F:
    """Run a state change under the state's lock."""

    @functools.wraps(method)
    def run(self: "ModelState", *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


def check_adapter_name(adapter_name: Any) -> None:
    """Adapter names are names, not paths: save_pretrained writes `<folder>/<name>/`, so a name must not
    be able to point anywhere else."""
    if not isinstance(adapter_name, str):
        raise ConfigError(f"adapter name must be a str, got {type(adapter_name).__name__} {adapter_name!r}.")
    problem = (
        "is empty"
        if not adapter_name
        else "contains a NUL byte"
        if "\0" in adapter_name
        else "is a path"
        if os.path.isabs(adapter_name) or "/" in adapter_name or "\\" in adapter_name
        else "contains '.'"
        if "." in adapter_name
        else "is reserved for rows without adapter"
        if adapter_name == BASE_ROW
        else None
    )
    if problem is not None:
        raise ConfigError(
            f"adapter name {adapter_name!r} {problem}; an adapter name is a plain name such as "
            "'default' or 'task_b' (no '.', '/', '\\' or NUL, not empty, not '__base__')."
        )


class ModelState:
    """Adapters, captures and variants of one wrapped model, and the choice of graph for each call."""

    def __init__(
        self,
        model: nn.Module,
        store: AdapterStore,
        example_inputs: Any = None,
        dynamic_axes: Optional[dict[str, dict[int, str]]] = None,
    ) -> None:
        self.model = model
        self.store = store
        self.capturer = Capturer(model, dynamic_axes)
        self.variants = VariantCache()
        self.example_inputs = example_inputs
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.merge_cache: dict[str, Any] = {}  # what unmerge needs from merge (DoRA's weight norms)
        self.lock = threading.RLock()
        self._last_capture: Optional[Capture] = None
        self.quant = adopt_bnb_modules(model)  # a QuantStore when the model holds bitsandbytes layers
        self.variants.quant = self.quant
        self.embeddings = io.embedding_modules(model)
        self._embedding_paths = tuple(_paths(model, pair) for pair in self.embeddings)

    def __getstate__(self) -> dict[str, Any]:
        """Copies (copy.deepcopy, pickle, torch.save of the model) get their own lock and no captures
        or graphs (Capturer and VariantCache drop theirs): those are rebuilt over the copy's tensors."""
        state = self.__dict__.copy()
        state.update(lock=None, _last_capture=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    @property
    def env(self) -> MethodEnv:
        """What methods and io work on."""
        return MethodEnv(self.model, self.store, self._scratch_reference_graph)

    def _scratch_reference_graph(self) -> fx.GraphModule:
        return self.reference_capture().fresh_module()

    # -- adding and removing adapters ----------------------------------------------------------------

    @locked
    def add_adapter(
        self,
        name: str,
        config: AdapterConfig,
        weights: Optional[dict[str, torch.Tensor]] = None,
        source: str = "weights",
    ) -> None:
        """Add an adapter (active only if it is the first, as in PEFT). `weights`, a PEFT-format state
        dict, are checked against the plan before anything changes: a bad checkpoint changes nothing."""
        check_adapter_name(name)
        if name in self.store.configs:
            raise ConfigError(
                f"an adapter named {name!r} exists already; pick another name or delete_adapter() it first."
            )
        method = method_for(config)
        self._check_same_kind(config)
        config = method.prepare_config(config, self.model, from_checkpoint=weights is not None)
        plan = self.plan(name, config)
        entries = io.plan_entries(self.env, plan)
        matched = io.check_weights(entries, weights, source) if weights is not None else None
        first = not self.active
        with self.rollback_on_failure(name):
            self.commit(plan, trainable=first and not config.inference_mode)
            if matched is not None:
                io.copy_weights(self.env, entries, matched)
            if first:
                self.active = [name]

    @locked
    def load_weights(self, name: str, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
        """New weights into an existing adapter, in place (PEFT's load_adapter onto a known name: what
        Trainer's resume_from_checkpoint and load_best_model_at_end do). Checked first: a checkpoint that
        does not fit the adapter changes nothing."""
        self.check_known([name])
        if name in self.merged:
            raise ConfigError(f"adapter {name!r} is merged; unmerge_adapter() before loading new weights into it.")
        entries = io.plan_entries(self.env, io.existing_plan(self.store, name))
        io.copy_weights(self.env, entries, io.check_weights(entries, weights, source))

    def plan(self, name: str, config: AdapterConfig) -> AdapterPlan:
        """The adapter's plan, from scratch copies of the reference graph (their generated code released)."""
        with scratch_code():
            return method_for(config).plan(self.env, name, config)

    def commit(self, plan: AdapterPlan, trainable: bool) -> None:
        """Create the plan's tensors. The first adapter freezes the base model, as PEFT does."""
        store, model = self.store, self.model
        if not store.configs:
            for p in model.parameters():
                p.requires_grad_(False)
        store.methods[plan.name] = plan.method
        store.configs[plan.name] = plan.config
        plan.method.create(self.env, plan)
        for path in plan.saved_paths:
            store.add_saved_module(plan.name, path, model.get_submodule(path))
        params = dict(model.named_parameters())
        for bias in plan.bias_names:
            params[bias].requires_grad_(not plan.config.inference_mode)
        store.bias_names[plan.name] = plan.bias_names
        store.generation.setdefault(plan.name, store.version)
        store.set_trainable(plan.name, trainable)

    @contextlib.contextmanager
    def rollback_on_failure(self, name: str) -> Iterator[None]:
        """Undo a half-done add on any exception (Ctrl-C included): the adapter's tensors and facts go,
        the base parameters get back their requires_grad flags and the active adapters stay as they were."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        active = list(self.active)
        try:
            yield
        except BaseException:
            self.store.delete(name)
            for p, flag in flags:
                p.requires_grad_(flag)
            self.active = active
            raise

    def _check_same_kind(self, config: AdapterConfig) -> None:
        kinds = set(self.store.kinds.values())
        if kinds and kinds != {config.peft_type}:
            raise ConfigError(
                f"cannot add a {config.peft_type} adapter to a model holding {sorted(kinds)} adapters "
                "(PEFT refuses mixing adapter types too); use a separate peftfx.apply."
            )

    def check_known(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.store.configs]
        if missing:
            raise ConfigError(f"unknown adapter(s) {missing}; loaded adapters: {self.store.adapter_names()}.")

    def check_can(self, names: Sequence[str], ability: str, what: str) -> None:
        """Refuse adapters whose method lacks an ability ("can_merge", "can_combine", ...)."""
        unable = [n for n in names if not getattr(self.store.method_of(n), ability)]
        if unable:
            kinds = sorted({self.store.method_of(n).peft_type for n in unable})
            raise ConfigError(f"{kinds} adapters {unable} cannot be {what} (as in PEFT).")

    @locked
    def set_adapter(self, names: list[str]) -> None:
        """Activate adapters; inactive ones are frozen, active ones trainable unless loaded for inference."""
        if not names:
            raise ConfigError(
                "set_adapter([]) names no adapter; give one or more of "
                f"{self.store.adapter_names()}, or use `with pm.disable_adapter():` for the base model."
            )
        self.check_known(names)
        if len(names) > 1 and not all(self.store.method_of(n).can_stack for n in names):
            raise ConfigError(
                f"{sorted({self.store.method_of(n).peft_type for n in names})} adapters run one at "
                f"a time; set_adapter one of {names}."
            )
        if self.merged and names != self.active:
            warnings.warn(
                f"adapters {self.merged} are merged; set_adapter does not unmerge them (call unmerge_adapter() first).",
                stacklevel=3,
            )
        for name in self.store.adapter_names():
            if not self.store.configs[name].inference_mode:
                self.store.set_trainable(name, name in names)
        self.active = names

    @locked
    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; if it was active, the remaining active ones (or the first left) take over."""
        self.check_known([name])
        if name in self.merged:
            raise ConfigError(f"adapter {name!r} is merged; unmerge_adapter() before deleting it.")
        self.store.delete(name)
        if name in self.active:
            rest = [n for n in self.active if n != name] or self.store.adapter_names()[:1]
            self.active = []
            if rest:
                self.set_adapter(rest)

    @locked
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        name: str,
        combination_type: str,
        svd_rank: Optional[int],
        options: dict[str, Any],
    ) -> None:
        """A new adapter combining others (the method's combination rules); inactive."""
        from ..combine import combine_site, combined_rank

        if name in self.store.configs:
            return  # PEFT returns silently when the name exists
        if not adapters:
            raise ConfigError(
                "add_weighted_adapter got no adapters to combine; pass the names of existing "
                f"adapters ({self.store.adapter_names()}) and one weight each."
            )
        if len(adapters) != len(weights):
            raise ConfigError(f"got {len(adapters)} adapters but {len(weights)} weights; give one weight each.")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        self.check_known(list(adapters))
        self.check_can(list(adapters), "can_combine", "combined")
        saved = self.store.saved
        shared = sorted(
            p
            for p in {p for a in adapters for p in saved.get(a, {})}
            if sum(p in saved.get(a, {}) for a in adapters) > 1
        )
        if shared:
            raise ConfigError(
                f"adapters {adapters} each save module(s) {shared} (modules_to_save); trained "
                "copies of one module cannot be combined. Combine adapters that save different "
                "modules, or none."
            )
        rank = combined_rank(self.store, adapters, combination_type, svd_rank)
        configs = [cast(LoraConfig, self.store.configs[a]) for a in adapters]  # check_can: LoRA's configs
        first = configs[0]
        targets = [c.target_modules for c in configs]
        if len({type(t) for t in targets}) > 1:
            raise ConfigError("cannot combine adapters whose target_modules mix lists and regex strings.")
        union = (
            "|".join(f"({t})" for t in targets)
            if isinstance(targets[0], str)
            else sorted(set().union(*[set(t or []) for t in targets])) or None
        )
        config = dataclasses.replace(
            first,
            r=rank,
            lora_alpha=rank,
            target_modules=union,
            alpha_pattern={},
            rank_pattern={},
            init_lora_weights=True,
            inference_mode=True,
        )
        check_adapter_name(name)
        plan = self.plan(name, config)
        combined = {
            s.key: combine_site(self.store, s.key, adapters, weights, combination_type, rank, options)
            for s in plan.sites
        }
        with self.rollback_on_failure(name), torch.no_grad():
            self.commit(plan, trainable=False)
            for key, ab in combined.items():
                tensors = self.store.site_tensors(name)[key]
                tensors["A"].zero_(), tensors["B"].zero_()
                if ab is not None:
                    tensors["A"].copy_(ab[0]), tensors["B"].copy_(ab[1])

    # -- merging and quantization --------------------------------------------------------------------

    @locked
    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        self.check_known(names)
        self.check_can(names, "can_merge", "merged")
        todo = [n for n in names if n not in self.merged]
        if len(todo) < len(names):
            warnings.warn(f"already merged: {[n for n in names if n in self.merged]}", stacklevel=3)
        merge.merge(self.model, self.store, todo, safe_merge=safe_merge, quant=self.quant, cache=self.merge_cache)
        self.merged += todo

    @locked
    def unmerge(self) -> None:
        merge.unmerge(self.model, self.store, self.merged, quant=self.quant, cache=self.merge_cache)
        self.merged = []
        self.merge_cache.clear()

    @locked
    def quantize(self, config: Any) -> Any:
        from ..quantize_weights import quantize_model

        if self.quant is not None:
            raise ConfigError("the base model is quantized already.")
        if self.merged:
            raise ConfigError(f"adapters {self.merged} are merged; unmerge_adapter() before quantizing.")
        keep = tuple(p for saved in self.store.saved.values() for p in saved)
        quant, report = quantize_model(self.reference_capture().fresh_module(), self.model, config, keep)
        self.quant = self.variants.quant = quant
        self.variants.clear()
        return report

    @locked
    def dequantize(self) -> None:
        """Full-precision weights back into the model; merged adapters are unmerged first and merged again
        in full precision."""
        if self.quant is None:
            return
        from ..quantize_weights import dequantize_into_model

        merged = list(self.merged)
        if merged:
            self.unmerge()
        dequantize_into_model(self.model, self.quant)
        self.quant = self.variants.quant = None
        self.variants.clear()
        if merged:
            self.merge(merged)

    @locked
    def hand_back(self) -> nn.Module:
        """The user's model; hollow quantized weights become bitsandbytes layers (runnable without peftfx)."""
        if self.quant is not None:
            to_bnb_modules(self.model, self.quant)
            self.quant = self.variants.quant = None
            self.variants.clear()
            self.forget_captures()
        return self.model

    @locked
    def copy_saved_modules_into_model(self) -> None:
        """The active adapters' trained module copies written into the model's own modules."""
        with torch.no_grad():
            for adapter in reversed(self.active):
                for path, clone in self.store.saved.get(adapter, {}).items():
                    original = self.model.get_submodule(path)
                    for (_, dst), (_, src) in zip(
                        original.state_dict(keep_vars=True).items(), clone.state_dict(keep_vars=True).items()
                    ):
                        dst.copy_(src)

    def forget_captures(self) -> None:
        """Drop every capture and variant (after `.to()`, which replaces buffers the graphs hold)."""
        self.capturer.clear()
        self.variants.clear()
        self.store.version += 1
        self._last_capture = None

    # -- choosing the graph -------------------------------------------------------------------------

    def reference_inputs(self) -> dict[str, Any]:
        """The user's example inputs, or ones made from the HF config, by name."""
        example = self.example_inputs
        if example is None:
            example = hf_example_inputs(self.model)
        args, kwargs = ((), dict(example)) if isinstance(example, dict) else (tuple(example), {})
        return self.capturer.prepare_inputs(args, kwargs)

    def reference_capture(self) -> Capture:
        """The capture used to find targets (the last call's, else the reference inputs')."""
        if self._last_capture is None:
            self._last_capture = self.capturer.get(self.reference_inputs(), training=False)
        return self._last_capture

    def input_adapter(self) -> Optional[str]:
        """The active adapter whose method captures with other inputs (prompt learning), unless disabled."""
        if self.disabled or not self.active:
            return None
        adapter = self.active[0]
        return adapter if self.store.method_of(adapter).stage == "inputs" else None

    def check_base(self) -> None:
        """A base model changed under the graphs (resize_token_embeddings, set_input_embeddings, tie_weights)
        is captured again; if an adapter or saved module sits on a changed module, the call is refused: its
        tensors were made for the old shapes. Cheap: identity checks per call."""
        now = io.embedding_modules(self.model)
        if _same(now, self.embeddings):
            return
        changed = {
            path
            for (old_module, old_weight), (module, weight), old_paths in zip(
                self.embeddings, now, self._embedding_paths
            )
            if old_module is not module or old_weight is not weight
            for path in _paths(self.model, (module, weight)) | old_paths
        }
        for adapter, touched in self.adapters_on(changed).items():
            raise ConfigError(
                f"the base model's {touched} changed after adapter {adapter!r} was added on them (a "
                "resize_token_embeddings or new embedding module?); its tensors have the old shapes. "
                "Resize the base model before peftfx.apply, or delete_adapter() and add it again."
            )
        self.forget_captures()
        self.embeddings = now
        self._embedding_paths = tuple(_paths(self.model, pair) for pair in now)

    def adapters_on(self, paths: Optional[set[str]] = None) -> dict[str, list[str]]:
        """{adapter: the sites and saved modules it has among `paths`} (default: the embedding modules),
        for adapters that have any."""
        paths = set().union(*self._embedding_paths) if paths is None else paths
        found = {
            adapter: sorted(
                {key for key in self.store.sites.get(adapter, {}) if key in paths}
                | {path for path in self.store.saved.get(adapter, {}) if path in paths}
            )
            for adapter in self.store.adapter_names()
        }
        return {adapter: touched for adapter, touched in found.items() if touched}

    def capture_for(
        self, named: dict[str, Any], training: bool, part: str = FULL
    ) -> tuple[Capture, dict[str, Any], tuple]:
        """(capture, inputs to call its variants with, the prompt part of the spec) for a call of the
        whole model or (part=BACKBONE) of its backbone."""
        self.check_base()
        adapter = self.input_adapter()
        if adapter is not None:
            if part != FULL:
                raise ConfigError(
                    f"adapter {adapter!r} is a prompt-learning adapter, whose virtual tokens peftfx adds to the "
                    "whole model's call only; call the PeftFxModel itself rather than its base_model."
                )
            inputs = self.store.method_of(adapter).call_inputs(self.store, adapter, named, self.model)
            if inputs is not None:
                capture_named, call_named, source = inputs
                return self.capturer.get(capture_named, training), call_named, (adapter, source)
        capture = self.capturer.get(named, training, part)
        if part == FULL:
            self._last_capture = capture
        return capture, named, ()

    def spec_for(self, capture: Capture, prompt: tuple[str, ...] = ()) -> VariantSpec:
        """The spec of the current state for a capture: disabled -> the base graph; otherwise the
        unmerged active adapters' layouts (bound through a slot bank) and the saved modules they read."""
        training = capture.signature.training
        if self.disabled:
            return VariantSpec(training=training)
        saving = tuple(a for a in self.active if self.store.saved.get(a))
        if prompt:
            return VariantSpec(prompt=prompt, saved=saving[:1], training=training)
        unmerged = self.bound_adapters()
        return VariantSpec(lora=tuple(self.store.layout(a) for a in unmerged), saved=saving, training=training)

    def bound_adapters(self) -> tuple[str, ...]:
        """The active banked adapters a slot bank binds, by position (merged ones run in the base weights)."""
        return tuple(a for a in self.active if a not in self.merged and self.store.method_of(a).banked)

    def variant(self, capture: Capture, spec: Optional[VariantSpec] = None) -> tuple[fx.GraphModule, Callable]:
        """(graph, callable running it) of a spec (default: the current state's) over a capture."""
        spec = self.spec_for(capture) if spec is None else spec
        bind = self.bound_adapters() if spec.lora else ()
        return self.variants.get(capture, self.model, self.store, spec, bind=bind)

    def runner(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        adapter_names: Optional[Sequence[str]],
        training: bool,
        part: str = FULL,
    ) -> tuple[Callable[..., Any], dict[str, Any]]:
        """(callable, the inputs to call it with) for one forward call, chosen under the lock."""
        with self.lock:
            named = self.capturer.prepare_inputs(args, kwargs)
            loss = outside_loss(self.model) if part == FULL and "labels" in named else None
            if loss is not None and adapter_names is None and self.input_adapter() is None:
                taken = {name: named.pop(name) for name in LOSS_INPUTS if name in named}
                run, named = self.runner((), named, None, training, part)
                vocab_size = int(getattr(self.model, "config").vocab_size)  # noqa: B009 - typed as Module
                return WithLoss(run, loss, vocab_size, taken), named
            capture, named, prompt = self.capture_for(named, training, part)
            if adapter_names is not None:
                if prompt:
                    raise ConfigError(
                        "adapter_names (mixed batches) does not work with prompt-learning adapters "
                        "(as in PEFT); use LoRA, DoRA or IA3 adapters."
                    )
                return self.mixed_runner(capture, adapter_names, named, training), named
            run = self.variant(capture, self.spec_for(capture, prompt))[1]
            self.before_run(self.bound_adapters() if not self.disabled else (), training)
            return run, named

    def before_run(self, adapters: Sequence[str], training: bool) -> None:
        """Let each method refresh what its graphs read as constants (AdapterMethod.before_run)."""
        by_method: dict[Any, list[str]] = {}
        for adapter in adapters:
            by_method.setdefault(self.store.method_of(adapter), []).append(adapter)
        for method, names in by_method.items():
            method.before_run(self.store, tuple(names), training)

    def mixed_runner(self, capture: Capture, adapter_names: Sequence[str], named: dict, training: bool) -> Callable:
        """The callable of a mixed batch, with its per-row adapter index bound. Disabled adapters win over
        adapter_names (PEFT), and a batch whose rows are all "__base__" runs the base graph."""
        spec, row_index = self.mixed_spec(adapter_names, named, training)
        if self.disabled or not spec.mixed:
            return self.variant(capture, VariantSpec(training=False))[1]
        _, run = self.variant(capture, spec)
        self.before_run(spec.mixed, training=False)
        return functools.partial(run, **{spec.row_input: row_index})

    def mixed_spec(self, adapter_names: Sequence[str], named: dict, training: bool) -> tuple[VariantSpec, torch.Tensor]:
        if training:
            raise ConfigError("adapter_names (mixed-adapter batches) is for inference; call pm.eval() first.")
        if self.merged:
            raise ConfigError("adapter_names cannot be used while adapters are merged; unmerge_adapter() first.")
        rows = list(adapter_names)
        batch = next(v for v in named.values() if isinstance(v, torch.Tensor)).shape[0]
        if len(rows) != batch:
            raise ConfigError(f"adapter_names has {len(rows)} entries but the batch has {batch} rows.")
        names = tuple(sorted({r for r in rows if r != BASE_ROW}))
        self.check_known(list(names))
        self.check_can(list(names), "can_mix", "used in mixed batches")
        saving = [n for n in names if self.store.saved.get(n)]
        if saving:
            raise ConfigError(f"adapters {saving} have modules_to_save; mixed batches support adapters without.")
        position = {n: i for i, n in enumerate(names)}
        device = next(self.model.parameters()).device
        row_index = torch.tensor([position.get(r, len(names)) for r in rows], dtype=torch.long, device=device)
        return VariantSpec(mixed=names, training=False), row_index

    def graph_for(self, named: Optional[dict[str, Any]] = None, training: bool = False) -> fx.GraphModule:
        """The GraphModule the current state runs for a call's inputs (default: the last call's capture,
        else the reference inputs)."""
        if named is None and self.input_adapter() is None:
            return self.variant(self.reference_capture())[0]
        capture, _, prompt = self.capture_for(self.reference_inputs() if named is None else named, training)
        return self.variant(capture, self.spec_for(capture, prompt))[0]

    def fresh_variant(
        self, named: dict[str, Any], adapters: list[str], fold_adapters: bool
    ) -> tuple[fx.GraphModule, VariantSpec]:
        """A fresh eval-mode graph (never a cached one: export edits it) running `adapters` on a call's
        inputs; with `fold_adapters` the banked adapters' paths are left out (their deltas go into the
        weights) and only their saved modules are read."""
        input_methods = [a for a in adapters if self.store.method_of(a).stage == "inputs"]
        if input_methods and len(adapters) > 1:
            raise ConfigError("a prompt-learning adapter runs alone; pass one adapter.")
        saving = tuple(a for a in adapters if self.store.saved.get(a))
        bind: tuple[str, ...] = ()
        if input_methods:
            adapter = input_methods[0]
            capture_named, _, source = self.store.method_of(adapter).call_inputs(self.store, adapter, named, self.model)
            capture = self.capturer.get(capture_named, training=False)
            spec = VariantSpec(prompt=(adapter, source), saved=saving[:1])
        else:
            capture = self.capturer.get(named, training=False)
            if not fold_adapters:
                bind = tuple(a for a in adapters if a not in self.merged and self.store.method_of(a).banked)
            spec = VariantSpec(lora=tuple(self.store.layout(a) for a in bind), saved=saving)
        self.before_run(bind, training=False)
        gm = build_variant(capture, self.model, self.store, spec, bind, self.quant, fuse=self.variants.fusion)
        return gm, spec

    def base_graph_for(self, named: Optional[dict[str, Any]] = None, training: bool = False) -> fx.GraphModule:
        """The base variant of the capture `graph_for` uses, so node names match (prompt-learning
        variants are rewritten from their own capture, so their base is that capture's)."""
        if named is None and self.input_adapter() is None:
            capture = self.reference_capture()
        else:
            capture, _, _ = self.capture_for(self.reference_inputs() if named is None else named, training)
        return self.variant(capture, VariantSpec(training=capture.signature.training))[0]

    # -- introspection --------------------------------------------------------------------------------

    def captures(self) -> list[Capture]:
        """Every capture made so far (forward and decode graphs)."""
        return self.capturer.all()

    def variant_specs(self) -> list[VariantSpec]:
        """The specs of the variant graphs built and kept now, oldest first (what later calls reuse)."""
        return self.variants.specs()

    def variant_graphs(self) -> list[tuple[VariantSpec, fx.GraphModule]]:
        """(spec, graph) of every variant kept now, oldest first."""
        return self.variants.graphs()

    # -- options ---------------------------------------------------------------------------------------

    @locked
    def set_fusion(self, enabled: bool) -> None:
        if bool(enabled) != self.variants.fusion:
            self.variants.clear()
            self.variants.fusion = bool(enabled)

    @locked
    def set_compile(self, options: Optional[dict[str, Any]]) -> None:
        """torch.compile every variant with `options` (None: run eagerly again); drops built variants."""
        self.variants.clear()
        self.variants.compile_options = None if options is None else {"dynamic": True, **options}


def _same(a: tuple, b: tuple) -> bool:
    return all(x is y for pair_a, pair_b in zip(a, b) for x, y in zip(pair_a, pair_b))


def _paths(model: nn.Module, pair: tuple) -> set[str]:
    return set(io.module_paths(model, (pair[0],)))


def hf_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Token ids and a mask for a transformers model, from its config (no tokenizer, no download)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise ConfigError(
            f"cannot make example inputs for {type(model).__name__}; pass example_inputs="
            "{'name': tensor, ...} (or a tuple of positional tensors) to peftfx.apply."
        )
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
