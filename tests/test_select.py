"""Matching semantics: peftfx's rules agree with PEFT's own check_target_module_exists and
get_pattern_key on generated module paths and configs (PEFT is the oracle)."""
from __future__ import annotations

import peft
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from peftfx.config import LoraConfig
from peftfx.select import is_target, pattern_value

NAMES = ["q_proj", "v_proj", "proj", "dense", "fc1", "c_attn"]
CONTAINERS = ["layers", "h", "blocks"]

keys = st.builds(
    lambda root, container, idx, sub, name: ".".join(p for p in (root, container, str(idx), sub, name) if p),
    st.sampled_from(["", "model", "transformer.encoder"]), st.sampled_from(CONTAINERS),
    st.integers(0, 12), st.sampled_from(["", "attn", "mlp.experts.1"]), st.sampled_from(NAMES))
name_lists = st.lists(st.sampled_from(NAMES + ["attn.q_proj", "0.attn.v_proj"]), min_size=1, max_size=3, unique=True)
layer_sel = st.one_of(st.none(), st.integers(0, 12), st.lists(st.integers(0, 12), min_size=1, max_size=3, unique=True))


@settings(max_examples=300, deadline=None)
@given(key=keys, targets=name_lists, layers=layer_sel, pattern=st.sampled_from([None, "layers", "h", ["h", "blocks"]]),
       exclude=st.one_of(st.none(), name_lists))
def test_list_targets_agree_with_peft(key, targets, layers, pattern, exclude):
    if pattern is not None and layers is None:
        return  # peft refuses layers_pattern without layers_to_transform; so do we
    kwargs = dict(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern, exclude_modules=exclude)
    want = bool(check_target_module_exists(peft.LoraConfig(**kwargs), key))
    ours = LoraConfig(**kwargs)
    assert is_target(key, ours, ours.target_modules, ours.resolved_modules_to_save(), None) == want


@settings(max_examples=200, deadline=None)
@given(key=keys, regex=st.sampled_from([r".*proj", r".*\.(q|v)_proj", r"model\..*", r".*layers\.1\..*", r"dense"]),
       exclude=st.one_of(st.none(), st.sampled_from([r".*\.1\..*", r".*mlp.*"])))
def test_regex_targets_agree_with_peft(key, regex, exclude):
    kwargs = dict(target_modules=regex, exclude_modules=exclude)
    want = bool(check_target_module_exists(peft.LoraConfig(**kwargs), key))
    ours = LoraConfig(**kwargs)
    assert is_target(key, ours, ours.target_modules, [], None) == want


@settings(max_examples=200, deadline=None)
@given(key=keys, patterns=st.lists(st.sampled_from(["q_proj", "proj", "attn.q_proj", r"layers\.1\..*", "fc1", "h.2.attn.q_proj"]),
                                   max_size=3, unique=True))
def test_rank_pattern_lookup_agrees_with_peft(key, patterns):
    table = {p: i + 2 for i, p in enumerate(patterns)}
    want = table.get(get_pattern_key(table.keys(), key), 1)
    assert pattern_value(table, key, 1) == want


def test_modules_to_save_are_never_targets():
    cfg = LoraConfig(target_modules=["dense"], modules_to_save=["classifier"])
    assert not is_target("classifier.dense", cfg, cfg.target_modules, cfg.resolved_modules_to_save(), None)
    assert is_target("encoder.dense", cfg, cfg.target_modules, cfg.resolved_modules_to_save(), None)
