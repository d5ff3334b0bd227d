"""IA3 against HF PEFT (the oracle): checkpoints both ways, feed-forward and output sites, merge, several
active adapters, mixed batches, training, export and config errors."""
from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch

import peftfx
from conftest import batch, perturb_trainable
from peftfx.config import config_from_dict
from peftfx.methods.ia3 import IA3Config

CASES = {
    "llama-default": ("llama", dict()),
    "llama-list": ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], feedforward_modules=["up_proj"])),
    "llama-regex": ("llama", dict(target_modules=r".*\.layers\.[02]\..*(k_proj|gate_proj)",
                                  feedforward_modules=r".*gate_proj")),
    "gpt2-default": ("gpt2", dict()),
    "gpt2-all-linear": ("gpt2", dict(target_modules="all-linear", feedforward_modules=["c_fc"], fan_in_fan_out=True)),
    "bert-seqcls": ("bert", dict(task_type="SEQ_CLS")),  # default targets; the classifier head is saved too
}


def _randomize(model: torch.nn.Module, adapter: str = "", seed: int = 7) -> None:
    """Non-identity vectors around 1 (PEFT's and peftfx's parameters are both named `...ia3_l.<adapter>`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"ia3_l.{adapter}" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _inputs():
    return [batch(3, 9), batch(1, 1, pad=False), batch(2, 17, seed=5)]


def _out(model, kw):
    out = model(**kw)
    return out.logits


def _assert_same(pm, ref, inputs=None):
    pm.eval(), ref.eval()
    for kw in inputs or _inputs():
        with torch.no_grad():
            got, want = _out(pm, kw), _out(ref, kw)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _peft_vectors(ref, adapter: str = "default") -> dict[str, torch.Tensor]:
    """site key -> PEFT's ia3_l of an adapter."""
    suffix = f".ia3_l.{adapter}"
    return {n[len("base_model.model."):-len(suffix)]: p for n, p in ref.named_parameters() if n.endswith(suffix)}


def _peft_feedforward(ref) -> dict[str, bool]:
    from peft.tuners.ia3 import IA3Layer
    return {n[len("base_model.model."):]: m.is_feedforward for n, m in ref.named_modules() if isinstance(m, IA3Layer)}


def _twins(load_model, name, configs: dict[str, dict], tmp_path, trainable=False):
    """(PEFT model, peftfx model) with the same adapters, made in PEFT and moved over by checkpoint."""
    names = list(configs)
    ref = peft.get_peft_model(load_model(name), peft.IA3Config(**configs[names[0]]))
    for adapter in names[1:]:
        ref.add_adapter(adapter, peft.IA3Config(**configs[adapter]))
    for i, adapter in enumerate(names):
        _randomize(ref, adapter, seed=7 + i)
    ref.save_pretrained(str(tmp_path), selected_adapters=names)

    def folder(adapter):
        return str(tmp_path if adapter == "default" else tmp_path / adapter)

    pm = peftfx.load(load_model(name), folder(names[0]), adapter_name=names[0], is_trainable=trainable)
    for adapter in names[1:]:
        pm.load_adapter(folder(adapter), adapter_name=adapter, is_trainable=trainable)
    ref.eval(), pm.eval()
    return ref, pm


# -- checkpoints, both directions ----------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_checkpoint_loads_in_peftfx(case, load_model, tmp_path):
    name, kwargs = CASES[case]
    ref = peft.get_peft_model(load_model(name), peft.IA3Config(**kwargs))
    _randomize(ref)
    perturb_trainable(ref)  # the saved classifier head too
    ref.save_pretrained(str(tmp_path))
    pm = peftfx.load(load_model(name), str(tmp_path))
    # the same sites, the same vector shapes ((1, in) feed-forward, (out, 1) otherwise), the same mode
    vectors = _peft_vectors(ref)
    assert sorted(pm.adapters.sites["default"]) == sorted(vectors)
    for key, site in pm.adapters.sites["default"].items():
        assert pm.adapters.site_tensor("default", key, "l").shape == vectors[key].shape
        assert site.feedforward == _peft_feedforward(ref)[key]
    assert {s.feedforward for s in pm.adapters.sites["default"].values()} == {True, False}
    _assert_same(pm, ref)
    with torch.no_grad():  # the adapter changes the outputs (so the comparison tests it); disabled it does not
        base = load_model(name)(**batch()).logits
        assert (_out(pm, batch()) - base).abs().max() > 1e-3
        with pm.disable_adapter():
            torch.testing.assert_close(_out(pm, batch()), base, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftfx_checkpoint_loads_in_peft(case, load_model, tmp_path):
    name, kwargs = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: PEFT's "fan_in_fan_out is set to False but ... Conv1D"
        pm = peftfx.apply(load_model(name), peftfx.IA3Config(**kwargs))
    _randomize(pm)
    perturb_trainable(pm)
    pm.save_pretrained(str(tmp_path))
    ref = peft.PeftModel.from_pretrained(load_model(name), str(tmp_path))
    _assert_same(pm, ref)
    with open(tmp_path / "adapter_config.json") as f:
        saved = json.load(f)
    assert saved["peft_type"] == "IA3" and saved["target_modules"] is not None  # PEFT fills the defaults in too
    assert saved["fan_in_fan_out"] == (name == "gpt2")  # set from the layer type, as PEFT does


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainable_parameter_counts_match_peft(case, load_model):
    name, kwargs = CASES[case]
    ref = peft.get_peft_model(load_model(name), peft.IA3Config(**kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peftfx.apply(load_model(name), peft.IA3Config(**kwargs))  # a peft config object is accepted
    assert pm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert isinstance(pm.peft_config["default"], peftfx.IA3Config)


def test_default_init_is_identity(load_model):
    kw = batch()
    with torch.no_grad():
        want = load_model("llama")(**kw).logits
        pm = peftfx.apply(load_model("llama"), peftfx.IA3Config())
        torch.testing.assert_close(pm(**kw).logits, want, atol=0, rtol=0)
    assert all(torch.equal(t["l"], torch.ones_like(t["l"])) for t in pm.adapters.site_tensors("default").values())
    pm2 = peftfx.apply(load_model("llama"), peftfx.IA3Config(init_ia3_weights=False))
    assert not torch.equal(pm2.adapters.site_tensor("default", "model.layers.0.mlp.down_proj", "l"),
                           torch.ones(1, 96))


def test_feedforward_defaults_given_targets_follow_peft_and_reload(load_model, tmp_path):
    """GPT-2 with target_modules=['c_attn', 'c_proj'] and no feedforward_modules: PEFT makes mlp.c_proj
    feed-forward (its default name) but attn.c_proj not, and saves a config it cannot load again
    (feedforward_modules not a subset of target_modules). peftfx selects the same and saves a loadable one."""
    kwargs = dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    ref = peft.get_peft_model(load_model("gpt2"), peft.IA3Config(**kwargs))
    pm = peftfx.apply(load_model("gpt2"), peftfx.IA3Config(**kwargs))
    assert {k: s.feedforward for k, s in pm.adapters.sites["default"].items()} == _peft_feedforward(ref)
    _randomize(pm)
    pm.save_pretrained(str(tmp_path))
    ref2 = peft.PeftModel.from_pretrained(load_model("gpt2"), str(tmp_path))
    assert _peft_feedforward(ref2) == _peft_feedforward(ref)
    _assert_same(pm, ref2)
    # llama: targets without the default feed-forward name store no feed-forward module
    pm3 = peftfx.apply(load_model("llama"), peftfx.IA3Config(target_modules=["q_proj"]))
    assert pm3.peft_config["default"].feedforward_modules == []


def test_second_adapter_keeps_the_layers_mode_like_peft(load_model):
    """PEFT keeps one feed-forward mode per layer (its first adapter's): the vector shape follows it."""
    first, second = dict(target_modules=["q_proj"], feedforward_modules=[]), dict(target_modules=["q_proj"],
                                                                                 feedforward_modules=["q_proj"])
    ref = peft.get_peft_model(load_model("llama"), peft.IA3Config(**first))
    ref.add_adapter("b", peft.IA3Config(**second))
    pm = peftfx.apply(load_model("llama"), peftfx.IA3Config(**first))
    with pytest.warns(UserWarning, match="keeps the mode of its first adapter"):
        pm.add_adapter("b", peftfx.IA3Config(**second))
    for key, vector in _peft_vectors(ref, "b").items():
        assert pm.adapters.site_tensor("b", key, "l").shape == vector.shape


# -- several adapters, switching, mixed batches ---------------------------------------------------------

def test_set_adapter_switches_and_shares_one_graph(load_model, tmp_path):
    ref, pm = _twins(load_model, "llama", {"default": dict(), "b": dict()}, tmp_path)
    for adapter in ("b", "default", "b"):
        ref.set_adapter(adapter), pm.set_adapter(adapter)
        _assert_same(pm, ref, [batch()])
    lora_specs = [s for s in pm.variant_specs() if s.lora]
    assert len(lora_specs) == 1  # same layout: one banked graph serves both adapters


@pytest.mark.parametrize("name,configs", [
    ("llama", {"default": dict(), "b": dict(target_modules=["q_proj", "v_proj", "down_proj"])}),
    ("gpt2", {"default": dict(), "b": dict(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"])}),
])
def test_several_active_adapters_multiply_like_peft(name, configs, load_model, tmp_path):
    ref, pm = _twins(load_model, name, configs, tmp_path)
    ref.base_model.set_adapter(["default", "b"])  # PEFT multiplies the active adapters' vectors
    pm.set_adapter(["default", "b"])
    _assert_same(pm, ref)
    with torch.no_grad():
        pm.set_adapter("default")
        one = _out(pm, batch())
        pm.set_adapter(["default", "b"])
        assert (_out(pm, batch()) - one).abs().max() > 1e-3


MIXED = {"default": dict(), "b": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
         "c": dict(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"])}


@pytest.mark.parametrize("name,configs,rows", [
    ("llama", MIXED, ["default", "b", "__base__", "c"]),
    ("llama", MIXED, ["c", "c", "default", "__base__"]),
    ("gpt2", {"default": dict(), "b": dict(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"])},
     ["b", "__base__", "default"]),
])
def test_mixed_batch_rows_equal_single_adapter_runs(name, configs, rows, load_model, tmp_path):
    ref, pm = _twins(load_model, name, configs, tmp_path)
    kw = batch(len(rows), 10)
    with torch.no_grad():
        got = pm(**kw, adapter_names=rows).logits
    for i, adapter in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in kw.items()}
        with torch.no_grad():
            if adapter == "__base__":
                with ref.disable_adapter():
                    want = _out(ref, one)
            else:
                ref.set_adapter(adapter)
                want = _out(ref, one)
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # another batch of the same adapters: the same mixed graph
        pm(**kw, adapter_names=list(reversed(rows)))
    assert len([s for s in pm.variant_specs() if s.mixed]) == 1


def test_bf16_model_with_fp32_vectors_matches_peft(load_model, tmp_path):
    """PEFT keeps the vectors in fp32 on a bf16 model and casts around them; the graph does the same."""
    ref, pm = _twins(lambda n: load_model(n).to(torch.bfloat16), "llama", {"default": dict(), "b": dict()}, tmp_path)
    assert {t["l"].dtype for t in pm.adapters.site_tensors("default").values()} == {torch.float32}
    kw = batch()
    with torch.no_grad():
        got, want = _out(pm, kw), _out(ref, kw)
        mixed = pm(**kw, adapter_names=["b", "default", "__base__"]).logits
        ref.set_adapter("b")
        want_b = _out(ref, {k: v[:1] for k, v in kw.items()})
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(mixed[:1], want_b, atol=1e-2, rtol=1e-2)


# -- merging --------------------------------------------------------------------------------------------

def _with_biases(model):
    """Non-zero biases (GPT-2 starts with zeros), so scaling them in a merge is seen."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_and_unmerge_match_peft(name, load_model, tmp_path):
    configs = {"default": dict(), "b": dict(target_modules=["c_attn"] if name == "gpt2" else ["k_proj", "q_proj"],
                                            feedforward_modules=[])}
    ref, pm = _twins(lambda n: _with_biases(load_model(n)), name, configs, tmp_path)
    ref.base_model.set_adapter(["default", "b"])
    pm.set_adapter(["default", "b"])
    original = {n: p.detach().clone() for n, p in pm.base_model.named_parameters()}
    kw = batch()
    with torch.no_grad():
        unmerged = _out(pm, kw)
        ref.merge_adapter(), pm.merge_adapter()
        want = _out(ref, kw)
        got = _out(pm, kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, unmerged, atol=1e-4, rtol=1e-4)
    peft_weights = dict(ref.get_base_model().named_parameters())
    changed = 0
    for n, p in pm.base_model.named_parameters():
        peft_name = n
        if peft_name not in peft_weights:  # wrapped layers: <module>.base_layer.<weight|bias>
            module, _, leaf = n.rpartition(".")
            peft_name = f"{module}.base_layer.{leaf}"
        torch.testing.assert_close(p, peft_weights[peft_name], atol=0, rtol=0)
        changed += not torch.equal(p, original[n])
    assert changed > 0
    if name == "gpt2":  # the biases of output-scaled sites are scaled too
        assert not torch.equal(original["transformer.h.0.attn.c_attn.bias"],
                               dict(pm.base_model.named_parameters())["transformer.h.0.attn.c_attn.bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Unmerge result can be inaccurate for (IA)^3."
        ref.unmerge_adapter()
    pm.unmerge_adapter()
    for n, p in pm.base_model.named_parameters():  # PEFT's numbers (divide by l + 1e-8), close to the original
        module, _, leaf = n.rpartition(".")
        peft_p = peft_weights.get(n, peft_weights.get(f"{module}.base_layer.{leaf}"))
        torch.testing.assert_close(p, peft_p, atol=0, rtol=0)
        torch.testing.assert_close(p, original[n], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(_out(pm, kw), unmerged, atol=1e-4, rtol=1e-4)


def test_merge_and_unload_matches_peft(load_model, tmp_path):
    ref, pm = _twins(lambda n: _with_biases(load_model(n)), "gpt2", {"default": dict()}, tmp_path)
    kw = batch()
    with torch.no_grad():
        want = ref.merge_and_unload()(**kw).logits
        got = pm.merge_and_unload()(**kw).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- training --------------------------------------------------------------------------------------------

def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_train_step_matches_peft_gradients(name, load_model, tmp_path):
    ref, pm = _twins(lambda n: _no_dropout(load_model(n)), name, {"default": dict()}, tmp_path, trainable=True)
    assert pm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    ref.train(), pm.train()
    kw = batch(2, 8)
    ref(**kw, labels=kw["input_ids"]).loss.backward()
    pm(**kw, labels=kw["input_ids"]).loss.backward()
    vectors = _peft_vectors(ref)
    for key, vector in vectors.items():
        mine = pm.adapters.site_tensor("default", key, "l")
        assert mine.grad is not None and mine.grad.abs().sum() > 0, key
        torch.testing.assert_close(mine.grad, vector.grad, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in pm.base_model.parameters())
    before = {k: pm.adapters.site_tensor("default", k, "l").detach().clone() for k in vectors}
    torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1).step()
    torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1).step()
    for key, vector in vectors.items():
        mine = pm.adapters.site_tensor("default", key, "l")
        assert not torch.equal(mine, before[key])
        torch.testing.assert_close(mine, vector, atol=1e-5, rtol=1e-5)
    _assert_same(pm, ref, [batch()])


# -- export ----------------------------------------------------------------------------------------------

def _artifact_logits(path, inputs, feed=None):
    module = torch.export.load(path).module()
    if feed is not None:  # docs/export.md: switching the adapter of an unmerged artifact
        from safetensors.torch import load_file

        from peftfx.tools.export import load_adapter_into
        load_adapter_into(module, load_file(feed))
    with torch.no_grad():
        return [module(**kw)["logits"] for kw in inputs]


def _eager(pm, inputs):
    with torch.no_grad():
        return [_out(pm, kw) for kw in inputs]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_export_merged(name, load_model, tmp_path):
    _, pm = _twins(lambda n: _with_biases(load_model(n)), name, {"default": dict()}, tmp_path / "ckpt")
    inputs = [batch(3, 9), batch(1, 1, pad=False), batch(2, 14, seed=4)]
    before = {k: v.clone() for k, v in pm.base_model.state_dict().items()}
    path = peftfx.export(pm, str(tmp_path / "merged.pt2"))
    assert all(torch.equal(before[k], v) for k, v in pm.base_model.state_dict().items())
    program = torch.export.load(path)
    assert not any("ia3" in k or "peftfx_slots" in k for k in program.state_dict)  # folded into the weights
    for got, want in zip(_artifact_logits(path, inputs), _eager(pm, inputs)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_export_unmerged_serves_every_adapter_of_its_layout(load_model, tmp_path):
    _, pm = _twins(load_model, "gpt2", {"default": dict(), "b": dict()}, tmp_path / "ckpt")
    inputs = [batch(3, 9), batch(1, 1, pad=False)]
    path = peftfx.export(pm, str(tmp_path / "unmerged.pt2"), merged=False)
    assert sorted(os.listdir(path + ".adapters")) == ["b.safetensors", "default.safetensors"]
    for got, want in zip(_artifact_logits(path, inputs), _eager(pm, inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pm.set_adapter("b")
    feed = os.path.join(path + ".adapters", "b.safetensors")
    for got, want in zip(_artifact_logits(path, inputs, feed), _eager(pm, inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- configs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "feedforward_modules must be a subset"),
    (dict(init_ia3_weights="yes"), r"IA3Config.init_ia3_weights must be True or False"),
    (dict(fan_in_fan_out=1), r"IA3Config.fan_in_fan_out must be True or False"),
    (dict(target_modules=5), r"IA3Config.target_modules must be a list of module names or a regex"),
    (dict(feedforward_modules=["down_proj", 3]), r"IA3Config.feedforward_modules must be a list"),
    (dict(target_modules="(q_proj"), r"IA3Config.target_modules='\(q_proj' is not a valid regular expression"),
    (dict(modules_to_save="classifier"), r"IA3Config.modules_to_save must be a list of module names"),
    (dict(inference_mode="no"), "inference_mode must be True or False"),
    (dict(feedforward_modules="all-linear"), "feedforward_modules='all-linear' is not a module list"),
    (dict(peft_type="LORA"), "expected 'IA3'"),
])
def test_bad_configs_raise_config_error(kwargs, match):
    with pytest.raises(peftfx.ConfigError, match=match):
        peftfx.IA3Config(**kwargs)


def test_bad_configs_against_a_model(load_model):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x)

    example = {"x": torch.randn(2, 4)}
    with pytest.raises(peftfx.ConfigError, match="IA3Config.target_modules is not set"):
        peftfx.apply(Tiny(), peftfx.IA3Config(), example_inputs=example)
    with pytest.raises(peftfx.ConfigError, match="IA3Config.feedforward_modules is not set"):
        peftfx.apply(Tiny(), peftfx.IA3Config(target_modules=["proj"]), example_inputs=example)
    pm = peftfx.apply(Tiny(), peftfx.IA3Config(target_modules=["proj"], feedforward_modules=["proj"],
                                               init_ia3_weights=False), example_inputs=example)
    with torch.no_grad():  # a custom module works too: y = W (x * l) + b
        x = example["x"]
        l = pm.adapters.site_tensor("default", "proj", "l")
        torch.testing.assert_close(pm(x), pm.base_model.proj(x * l), atol=1e-6, rtol=1e-6)
    with pytest.raises(peftfx.TargetNotFoundError, match="matched no linear op"):
        peftfx.apply(load_model("llama"), peftfx.IA3Config(target_modules=["nope"], feedforward_modules=[]))
    with pytest.raises(peftfx.ConfigError, match="unknown config keys"):
        config_from_dict({"peft_type": "IA3", "r": 8})


def test_config_round_trips_and_is_exported():
    assert peftfx.IA3Config is IA3Config
    config = peftfx.IA3Config(target_modules={"k_proj", "down_proj"}, feedforward_modules=("down_proj",))
    assert config.target_modules == ["down_proj", "k_proj"] and config.feedforward_modules == ["down_proj"]
    again = config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    theirs = peft.IA3Config(**{k: v for k, v in config.to_dict().items() if k != "peft_type"})
    assert theirs.target_modules == {"k_proj", "down_proj"}
