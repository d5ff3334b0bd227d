"""Reliability (issue 15): names that are names, strict configs, failed calls that change nothing, PEFT's
warnings, empty calls, threads, and caches that stay bounded."""
from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import threading
import warnings

import peft
import pytest
import torch

import peftfx
from conftest import batch, perturb_trainable
from oracle import twin_models
from peftfx.code_cache import cached_source_count
from peftfx.errors import ConfigError
from peftfx.state import MIXED_VARIANT_LIMIT


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_same(model: torch.nn.Module, snapshot: dict) -> None:
    now = _snapshot(model)
    assert now.keys() == snapshot.keys()
    for name, (value, flag) in snapshot.items():
        assert torch.equal(now[name][0], value), name
        assert now[name][1] == flag, name


# -- adapter names are names, not paths (item 3) -----------------------------------------------------

@pytest.mark.parametrize("name", ["{tmp}", "../escape", "a/b", "a\\b", "x\0y", "", 3, None, "__base__", "a.b"])
def test_adapter_name_that_is_not_a_name_is_refused(name, load_model, tmp_path):
    target = tmp_path / "victim"
    target.mkdir()
    (target / "adapter_config.json").write_text("mine")
    name = str(target) if name == "{tmp}" else name
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=2, target_modules=["q_proj"]))
    before = _snapshot(pm)
    with pytest.raises(ConfigError, match="adapter name"):
        pm.add_adapter(name, peftfx.LoraConfig(r=2, target_modules=["q_proj"]))
    _assert_same(pm, before)
    assert pm.peft_config.keys() == {"default"}
    pm.save_pretrained(str(tmp_path / "out"))
    assert (target / "adapter_config.json").read_text() == "mine"  # nothing was written there
    with pytest.raises(ConfigError, match="adapter name"):
        peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name=name)
    with pytest.raises(ConfigError, match="adapter name"):
        pm.load_adapter(str(tmp_path / "out"), adapter_name=name)


# -- no crash on valid input: a mixed batch of base rows only (item 4) ----------------------------------

def test_mixed_batch_of_base_rows_only_matches_peft(load_model, tmp_path):
    ref, pm = twin_models(load_model, "llama", {"default": dict(r=4, target_modules=["q_proj", "v_proj"]),
                                                "b": dict(r=2, target_modules=["v_proj"])}, tmp_path)
    kw = batch(3, 6)
    rows = ["__base__"] * 3
    with torch.no_grad():
        want = ref(**kw, adapter_names=rows).logits
        got = pm(**kw, adapter_names=rows).logits
        with pm.disable_adapter():
            base = pm(**kw).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, base)
    tokens = pm.generate(**batch(2, 5, pad=False), max_new_tokens=3, adapter_names=["__base__"] * 2)
    want_tokens = ref.generate(**batch(2, 5, pad=False), max_new_tokens=3, do_sample=False,
                               adapter_names=["__base__"] * 2)
    assert torch.equal(tokens, want_tokens)


# -- strict config validation (item 5) --------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(r=True), "r must be a positive integer"),
    (dict(r=4.0), "r must be a positive integer"),
    (dict(r="8"), "r must be a positive integer"),
    (dict(rank_pattern={"q_proj": True}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    (dict(rank_pattern={"q_proj": 2.5}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    (dict(lora_alpha="16"), "lora_alpha must be a number"),
    (dict(lora_alpha=True), "lora_alpha must be a number"),
    (dict(alpha_pattern={"q_proj": "8"}), r"alpha_pattern\['q_proj'\] must be a number"),
    (dict(lora_dropout="0.1"), "lora_dropout must be a number"),
    (dict(init_lora_weights=1), "init_lora_weights=1 is not supported"),
    (dict(target_modules=["q_proj", 3]), "target_modules must be a list of module names"),
    (dict(layers_to_transform=[0, True], target_modules=["q_proj"]), "layers_to_transform must be"),
    (dict(use_rslora="yes"), "use_rslora must be True or False"),
])
def test_config_types_are_strict(kwargs, field, load_model):
    with pytest.raises(ConfigError, match=field):
        peftfx.LoraConfig(**kwargs)
    model = load_model("llama")
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=field):  # the same values in a peft config object
        peftfx.apply(model, _peft_config_bypassing_validation(kwargs))
    _assert_same(model, before)  # the failed call left every base parameter trainable and unchanged


def _peft_config_bypassing_validation(kwargs: dict) -> peft.LoraConfig:
    """A peft.LoraConfig carrying these values (PEFT itself checks few of them)."""
    config = peft.LoraConfig(target_modules=["q_proj"])
    for key, value in kwargs.items():
        object.__setattr__(config, key, value)
    return config


def test_a_failed_add_is_rolled_back(load_model, monkeypatch):
    """An exception in the middle of creating an adapter's tensors (here: Ctrl-C in the third weight
    initialisation) leaves the model, its adapters and the base parameters' flags as before."""
    model = load_model("llama")
    before = _snapshot(model)
    calls = itertools.count()
    real_init = torch.nn.init.kaiming_uniform_

    def interrupted(tensor, *args, **kwargs):
        if next(calls) == 2:
            raise KeyboardInterrupt
        return real_init(tensor, *args, **kwargs)

    config = peftfx.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    pm = peftfx.PeftFxModel(model)
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pm.add_adapter("default", config)  # the first adapter: it would freeze the base model
    _assert_same(model, before)
    assert pm.peft_config == {} and pm.active_adapters == [] and not list(pm.adapters.parameters())

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", real_init)
    pm.add_adapter("default", config)
    perturb_trainable(pm)
    kw = batch()
    with torch.no_grad():
        want = pm(**kw).logits
    state = _snapshot(pm)
    calls = itertools.count()
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pm.add_adapter("second", config)
    _assert_same(pm, state)
    assert list(pm.peft_config) == ["default"] and pm.active_adapters == ["default"]
    with torch.no_grad():
        assert torch.equal(pm(**kw).logits, want)
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", real_init)
    pm.add_adapter("second", config)  # the name is free again
    assert list(pm.peft_config) == ["default", "second"]


# -- errors that name the field, PEFT's warnings, empty calls (item 6) ---------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(target_modules="q_proj["), "target_modules"),
    (dict(target_modules=["q_proj"], exclude_modules="(v_proj"), "exclude_modules"),
    (dict(target_modules=["q_proj"], rank_pattern={"q_proj(": 4}), "rank_pattern key 'q_proj\\('"),
    (dict(target_modules=["q_proj"], alpha_pattern={"*q": 4}), "alpha_pattern key '\\*q'"),
])
def test_bad_regex_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"{field}.*not a valid regular expression"):
        peftfx.LoraConfig(**kwargs)


def test_unmatched_rank_and_alpha_pattern_keys_warn_as_peft_does(load_model):
    kwargs = dict(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4, "nothing_here": 3},
                  alpha_pattern={"q_proj": 8, "gone": 1})
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        peftfx.apply(load_model("llama"), peftfx.LoraConfig(**kwargs))
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        peft.get_peft_model(load_model("llama"), peft.LoraConfig(**kwargs))

    def pattern_warnings(records):
        return sorted(str(w.message) for w in records if "did not match any targeted module" in str(w.message)
                      and issubclass(w.category, RuntimeWarning))

    assert pattern_warnings(ours) == pattern_warnings(theirs)
    assert len(pattern_warnings(ours)) == 2  # one for rank_pattern's 'nothing_here', one for alpha_pattern's 'gone'


def test_empty_calls_are_refused_clearly(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="add_weighted_adapter got no adapters"):
        pm.add_weighted_adapter([], [], "mix")
    with pytest.raises(ConfigError, match=r"set_adapter\(\[\]\) names no adapter"):
        pm.set_adapter([])
    assert pm.active_adapters == ["default"] and list(pm.peft_config) == ["default"]


@pytest.mark.parametrize("ours,theirs,extra", [
    (peftfx.LoraConfig, peft.LoraConfig, {}),
    (peftfx.PromptTuningConfig, peft.PromptTuningConfig, {"num_virtual_tokens": 4}),
    (peftfx.PrefixTuningConfig, peft.PrefixTuningConfig, {"num_virtual_tokens": 4}),
])
def test_every_peft_field_is_accepted_at_its_default(ours, theirs, extra):
    reference = theirs(**extra)
    for f in dataclasses.fields(theirs):
        value = getattr(reference, f.name)
        value = getattr(value, "value", value)  # enums (task_type, prompt_tuning_init) as PEFT writes them
        ours(**{**extra, f.name: value})
    ours(**{f.name: getattr(getattr(reference, f.name), "value", getattr(reference, f.name))
            for f in dataclasses.fields(theirs)})


def test_unsupported_option_is_refused_at_construction():
    with pytest.raises(ConfigError, match="use_qalora=True is a PEFT option peftfx does not support yet"):
        peftfx.LoraConfig(use_qalora=True)
    with pytest.raises(ConfigError, match="layer_replication"):
        peftfx.LoraConfig(layer_replication=[[0, 2]])


# -- threads (item 7) ----------------------------------------------------------------------------------

def test_concurrent_merge_and_unmerge_leave_the_base_weights_intact(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(pm, scale=1.0)
    base = {n: p.detach().clone() for n, p in pm.base_model.named_parameters()}
    barrier = threading.Barrier(4)
    errors = []

    def worker():
        try:
            barrier.wait()
            for _ in range(40):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pm.merge_adapter()
                pm.unmerge_adapter()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert pm.merged_adapters == []
    for name, p in pm.base_model.named_parameters():
        torch.testing.assert_close(p.detach(), base[name], atol=1e-5, rtol=0)


def test_mixed_batch_forwards_from_threads_equal_serial_ones(load_model, tmp_path):
    _, pm = twin_models(load_model, "llama", {"default": dict(r=4, target_modules=["q_proj", "v_proj"]),
                                              "b": dict(r=2, target_modules=["v_proj"])}, tmp_path)
    kw = batch(3, 6)
    row_sets = [["default", "b", "__base__"], ["b", "b", "default"], ["__base__", "default", "b"]]
    with torch.no_grad():
        want = [pm(**kw, adapter_names=rows).logits for rows in row_sets]
    pm2 = peftfx.load(load_model("llama"), str(tmp_path)).eval()
    pm2.load_adapter(str(tmp_path / "b"), adapter_name="b")
    results: dict[int, torch.Tensor] = {}

    def worker(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = pm2(**kw, adapter_names=row_sets[i % 3]).logits

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 6
    for i, got in results.items():
        assert torch.equal(got, want[i % 3])


# -- bounded caches (item 8) -----------------------------------------------------------------------------

def test_adding_and_deleting_another_adapter_rebuilds_nothing(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=["q_proj"]))
    kw = batch()
    pm(**kw)
    graph = pm.graph_module
    sources = cached_source_count()
    for i in range(5):
        pm.add_adapter("x", peftfx.LoraConfig(r=2 + i, target_modules=["v_proj"]))
        pm(**kw)
        pm.delete_adapter("x")
    assert pm.graph_module is graph  # the default adapter's variant survived every store change
    assert cached_source_count() <= sources  # and the scratch graphs of planning left no source behind


def test_an_adapter_added_again_under_its_name_runs_its_new_weights(load_model):
    """Variants live across store changes now, so a slot bank must not keep pointing at the tensors of a
    deleted adapter whose name (and layout) came back."""
    config = peftfx.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=2, target_modules=["q_proj"]))
    kw = batch()
    for seed in (1, 2):
        torch.manual_seed(seed)
        pm.add_adapter("x", config)
        pm.set_adapter("x")
        with torch.no_grad():
            got = pm(**kw).logits
            mixed = pm(**kw, adapter_names=["x"] * 3).logits
        fresh = peftfx.PeftFxModel(load_model("llama"))
        fresh(**kw)  # captured before seeding: making example inputs would draw random numbers
        torch.manual_seed(seed)
        fresh.add_adapter("x", config)
        with torch.no_grad():
            want = fresh(**kw).logits
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mixed, want, atol=1e-5, rtol=1e-5)
        pm.set_adapter("default")
        pm.delete_adapter("x")
        with torch.no_grad():
            pm(**kw)
        # x's variants went with it: every LoRA variant left has the default adapter's layout (r=2)
        ranks = {site[1] for spec in pm.variant_specs() for _, sites in spec.lora for site in sites}
        assert ranks == {2} and not any(spec.mixed for spec in pm.variant_specs())


def test_mixed_batch_variants_are_bounded(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=2, target_modules=["q_proj"]))
    names = ["default"] + [f"a{i}" for i in range(5)]
    for name in names[1:]:
        pm.add_adapter(name, peftfx.LoraConfig(r=2, target_modules=["q_proj"]))
    kw = batch(2, 4)
    sets = list(itertools.combinations(names, 2))[: MIXED_VARIANT_LIMIT + 4]
    with torch.no_grad():
        for rows in sets:
            pm(**kw, adapter_names=list(rows))
            assert sum(bool(s.mixed) for s in pm.variant_specs()) <= MIXED_VARIANT_LIMIT
        # the most recently used set is kept: running it again builds nothing
        kept = pm.variant_specs()
        pm(**kw, adapter_names=list(sets[-1]))
        assert pm.variant_specs() == kept


def test_calls_through_torch_compile_reuse_their_capture(load_model):
    """torch.compile(pm) (and Trainer's torch_compile) trace pm's forward; the choice of capture and
    variant must not be traced with it, or dynamo specialises on the caches and captures at every call."""
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=2, target_modules=["q_proj"]))
    compiled = torch.compile(pm, backend="eager")
    kw = batch(2, 6)
    with torch.no_grad():
        want = pm(**kw).logits
        pm.to("cpu")  # drops the captures, as Trainer's .to(device) does: the first traced call finds none
        for _ in range(3):
            got = compiled(**kw).logits
            assert len(pm.variant_specs()) == 1  # the one variant of the first call, never a new capture
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_soak_add_forward_delete_and_many_mixed_sets(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    kw = batch(2, 6)

    def cycle(i):
        pm.add_adapter("x", peftfx.LoraConfig(r=2 + i % 3, target_modules=["q_proj"]))
        with torch.no_grad():
            pm(**kw)
            pm.set_adapter("x")
            pm(**kw)
            pm(**kw, adapter_names=["x", "default"])
        pm.set_adapter("default")
        pm.delete_adapter("x")

    for i in range(30):  # warm-up: allocator pools, layout caches
        cycle(i)
    gc.collect()
    start, sources = _rss_mb(), cached_source_count()
    for i in range(300):
        cycle(i)
    gc.collect()
    assert _rss_mb() - start < 5.0
    assert cached_source_count() <= sources

    names = ["default"] + [f"a{i}" for i in range(7)]
    for name in names[1:]:
        pm.add_adapter(name, peftfx.LoraConfig(r=2, target_modules=["q_proj"]))
    sets = [s for k in (2, 3, 4, 5) for s in itertools.combinations(names, k)][:200]
    assert len(sets) == 200
    with torch.no_grad():
        for rows in sets:
            pm(**batch(len(rows), 6), adapter_names=list(rows))
            assert sum(bool(s.mixed) for s in pm.variant_specs()) <= MIXED_VARIANT_LIMIT
