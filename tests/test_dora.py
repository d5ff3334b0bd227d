"""DoRA (`LoraConfig(use_dora=True)`) against HF PEFT's DoraLinearLayer: checkpoints both ways, training,
merge, the eval-time constant and its refresh, mixed batches, stacking, switching and export."""
from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftfx
from conftest import batch, perturb_trainable
from peftfx.methods.dora import _refresh_eval

aten = torch.ops.aten
CASES = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gpt2": dict(r=4, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="all"),
}


def _inputs():
    return [batch(3, 9), batch(1, 1, pad=False), batch(2, 17, seed=5)]


def _logits(model, inputs=None):
    model.eval()
    with torch.no_grad():
        return [model(**kw).logits for kw in (inputs or _inputs())]


def _close(got, want, tol=1e-5):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def _randomize(model, seed=7, scale=0.1):
    """Non-identity A, B and magnitudes (and trained biases): every trainable tensor moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _twins(load_model, name, tmp_path, trainable=False, **extra):
    """(PEFT model, peftfx model) with the same random DoRA adapter, made in PEFT, moved by checkpoint."""
    kwargs = {**CASES[name], **extra}
    ref = peft.get_peft_model(load_model(name), peft.LoraConfig(use_dora=True, init_lora_weights=False, **kwargs))
    _randomize(ref)
    ref.save_pretrained(str(tmp_path / "peft"))
    pm = peftfx.load(load_model(name), str(tmp_path / "peft"), is_trainable=trainable)
    return ref, pm


def _peft_grads(ref):
    return {n.replace("base_model.model.", "").replace(".base_layer", ""): p.grad
            for n, p in ref.named_parameters() if p.requires_grad}


def _peftfx_grads(pm):
    params = {**dict(pm.base_model.named_parameters()), **dict(pm.adapters.named_parameters())}
    return {n: params[n].grad for n in params if params[n].requires_grad}


# -- checkpoints, both directions ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_dora_checkpoint_loads_in_peftfx(name, load_model, tmp_path):
    ref, pm = _twins(load_model, name, tmp_path)
    assert type(pm.adapters.method_of("default")).__name__ == "Dora"
    base = _logits(load_model(name))
    want = _logits(ref)
    assert (want[0] - base[0]).abs().max() > 1e-2  # the adapter (A, B and m) changes the outputs
    _close(_logits(pm), want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_peftfx_dora_checkpoint_loads_in_peft(name, load_model, tmp_path):
    pm = peftfx.apply(load_model(name), peftfx.LoraConfig(use_dora=True, init_lora_weights=False, **CASES[name]))
    perturb_trainable(pm)
    pm.save_pretrained(str(tmp_path))
    ref = peft.PeftModel.from_pretrained(load_model(name), str(tmp_path))
    assert ref.peft_config["default"].use_dora
    _close(_logits(pm), _logits(ref))
    # same keys as a checkpoint PEFT writes itself
    own = peft.get_peft_model(load_model(name), peft.LoraConfig(use_dora=True, **CASES[name]))
    own.save_pretrained(str(tmp_path / "peft"))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)


@pytest.mark.parametrize("name", sorted(CASES))
def test_magnitude_init_and_trainable_count_match_peft(name, load_model):
    ref = peft.get_peft_model(load_model(name), peft.LoraConfig(use_dora=True, **CASES[name]))
    pm = peftfx.apply(load_model(name), peftfx.LoraConfig(use_dora=True, **CASES[name]))
    assert pm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    mine = {n: p for n, p in pm.adapters.named_parameters() if "lora_magnitude_vector" in n}
    theirs = {n.replace("base_model.model.", ""): p for n, p in ref.named_parameters() if "lora_magnitude_vector" in n}
    assert mine.keys() == theirs.keys() and mine
    for n in mine:  # B = 0 at init: m = ||W|| per output row
        torch.testing.assert_close(mine[n], theirs[n], atol=1e-6, rtol=1e-6)
    _close(_logits(pm), _logits(load_model(name)))  # an identity adapter at init


# -- training ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dropout", [("llama", 0.0), ("gpt2", 0.0), ("llama", 0.1)])
def test_train_loss_and_gradients_match_peft(name, dropout, load_model, tmp_path):
    ref, pm = _twins(load_model, name, tmp_path, trainable=True, lora_dropout=dropout)
    assert pm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    kw = batch()
    ref.train(), pm.train()
    # the same seed draws the same dropout masks: both run one dropout per adapted site, in layer order
    torch.manual_seed(11)
    want = ref(**kw, labels=kw["input_ids"]).loss
    want.backward()
    torch.manual_seed(11)
    got = pm(**kw, labels=kw["input_ids"]).loss
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    theirs, mine = _peft_grads(ref), _peftfx_grads(pm)
    assert theirs.keys() == mine.keys()
    assert any("lora_magnitude_vector" in n for n in mine)
    for n in theirs:
        assert mine[n] is not None, n
        torch.testing.assert_close(mine[n], theirs[n], atol=1e-5, rtol=1e-4)


def test_train_graph_recomputes_the_norm_and_eval_graph_reads_a_constant(load_model, tmp_path):
    _, pm = _twins(load_model, "llama", tmp_path, trainable=True)
    kw = batch()
    pm.train()
    pm(**kw, labels=kw["input_ids"]).loss.backward()
    pm.eval()
    with torch.no_grad():
        pm(**kw)
    graphs = {spec.training: gm for spec, gm in pm.state.variant_graphs() if spec.lora}
    ops = {t: [n.target for n in gm.graph.nodes if n.op == "call_function"] for t, gm in graphs.items()}
    sites = len(pm.adapters.sites["default"])
    assert ops[True].count(aten.sqrt.default) == sites  # train: the norm in the graph, per site
    assert aten.sqrt.default not in ops[False]  # eval: no norm, one addcmul per site
    assert ops[False].count(aten.addcmul.default) == sites
    assert ops[False].count(aten.linear.default) == ops[True].count(aten.linear.default)


def test_training_norm_formula_matches_the_direct_norm():
    """The train graph's ||W + sBA||² expansion against the direct norm, on bench-like sizes in fp32."""
    g = torch.Generator().manual_seed(0)
    for out_f, in_f, r, s in ((512, 512, 16, 2.0), (1376, 512, 16, 2.0), (64, 96, 4, 8.0)):
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        a = torch.randn(r, in_f, generator=g) * 0.1
        b = torch.randn(out_f, r, generator=g) * 0.1
        direct = torch.linalg.norm(w + s * b @ a, dim=1)
        c = s * b
        n2 = (w * w).sum(1) + (c * torch.addmm(w @ a.T, c, a @ a.T, beta=2)).sum(1)  # passes/dora.py's expansion
        torch.testing.assert_close(n2.sqrt(), direct, atol=1e-6, rtol=1e-5)


def test_eval_constant_follows_an_optimizer_step(load_model, tmp_path, monkeypatch):
    ref, pm = _twins(load_model, "gpt2", tmp_path, trainable=True)
    _close(_logits(pm), _logits(ref))
    calls = []
    monkeypatch.setattr("peftfx.methods.dora._refresh_eval", lambda *a: (calls.append(1), _refresh_eval(*a)))
    _logits(pm)
    assert not calls  # nothing changed: the constant is reused
    kw = batch()
    for model in (ref, pm):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        torch.manual_seed(11)  # GPT-2's own dropout: the same masks on both sides
        model(**kw, labels=kw["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    want = _logits(ref)
    got = _logits(pm)
    assert calls  # A, B, m (and the trained biases) moved: recomputed
    _close(got, want)
    calls.clear()
    _logits(pm)
    assert not calls


# -- merge ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_and_unmerge_match_peft(name, load_model, tmp_path):
    ref, pm = _twins(load_model, name, tmp_path)
    unmerged = _logits(pm)
    w0 = {n: p.detach().clone() for n, p in pm.base_model.named_parameters()}
    pm.merge_adapter()
    ref.merge_adapter()
    merged = _logits(pm)
    _close(merged, _logits(ref))
    _close(merged, unmerged, tol=1e-4)
    theirs = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in ref.named_parameters() if "lora_" not in n}
    for n, p in pm.base_model.named_parameters():  # the merged weights are PEFT's
        torch.testing.assert_close(p, theirs[n], atol=1e-6, rtol=1e-5)
    pm.unmerge_adapter()
    for n, p in pm.base_model.named_parameters():
        torch.testing.assert_close(p, w0[n], atol=1e-6, rtol=1e-5)
    _close(_logits(pm), unmerged)
    model = pm.merge_and_unload()
    _close(_logits(model), merged, tol=1e-5)


# -- several adapters ----------------------------------------------------------------------------------

def _two_dora_adapters(load_model, tmp_path, name="llama"):
    """Adapters "default" and "b" (same layout, other values and alpha) on both sides."""
    ref, pm = _twins(load_model, name, tmp_path, bias="none")  # PEFT trains a bias for one adapter only
    config = {**CASES[name], "lora_alpha": 3, "bias": "none"}
    ref.add_adapter("b", peft.LoraConfig(use_dora=True, init_lora_weights=False, **config))
    g = torch.Generator().manual_seed(9)  # "b" is inactive (frozen) in PEFT: move its own tensors
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".b." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(str(tmp_path / "both"), selected_adapters=["b"])
    pm.load_adapter(str(tmp_path / "both" / "b"), adapter_name="b")
    return ref, pm


def test_set_adapter_switches_dora_adapters_with_one_graph(load_model, tmp_path):
    ref, pm = _two_dora_adapters(load_model, tmp_path)
    for adapter in ("b", "default", "b"):
        ref.set_adapter(adapter), pm.set_adapter(adapter)
        _close(_logits(pm), _logits(ref))
    assert len([s for s in pm.variant_specs() if s.lora]) == 1  # same layout: one graph, rebound


def test_stacked_dora_adapters_match_peft(load_model, tmp_path):
    ref, pm = _two_dora_adapters(load_model, tmp_path)
    ref.base_model.set_adapter(["default", "b"])
    pm.set_adapter(["default", "b"])
    _close(_logits(pm), _logits(ref))


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_batch_rows_equal_single_adapter_runs(name, load_model, tmp_path):
    ref, pm = _two_dora_adapters(load_model, tmp_path, name)
    kw = batch(4, 10)
    rows = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        got = pm(**kw, adapter_names=rows).logits
    for i, adapter in enumerate(rows):
        row = {k: v[i:i + 1] for k, v in kw.items()}
        with torch.no_grad():
            if adapter == "__base__":
                with ref.disable_adapter():
                    want = ref(**row).logits
            else:
                ref.set_adapter(adapter)
                want = ref(**row).logits
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5)
    ops = [n.target for spec, gm in pm.state.variant_graphs() if spec.mixed
           for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(aten.addcmul.default) == len(pm.adapters.sites["default"])  # one path per site


def test_mixed_batch_of_lora_and_dora_rows(load_model, tmp_path):
    ref, pm = _twins(load_model, "llama", tmp_path)
    pm.add_adapter("plain", peftfx.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    kw = batch(3, 7)
    rows = ["plain", "default", "__base__"]
    with torch.no_grad():
        got = pm(**kw, adapter_names=rows).logits
        alone = []
        for i, adapter in enumerate(rows):
            row = {k: v[i:i + 1] for k, v in kw.items()}
            if adapter == "__base__":
                with pm.disable_adapter():
                    alone.append(pm(**row).logits)
            else:
                pm.set_adapter(adapter)
                alone.append(pm(**row).logits)
    torch.testing.assert_close(got, torch.cat(alone), atol=1e-5, rtol=1e-5)
    _close([alone[1]], [_logits(ref, [{k: v[1:2] for k, v in kw.items()}])[0]])


def test_lora_stacked_before_dora_matches_peft_and_the_other_order_is_refused(load_model, tmp_path):
    ref, pm = _twins(load_model, "llama", tmp_path)
    config = dict(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    ref.add_adapter("plain", peft.LoraConfig(**config))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".plain." in n:
                p.add_(0.1)
    ref.save_pretrained(str(tmp_path / "plain"), selected_adapters=["plain"])
    pm.load_adapter(str(tmp_path / "plain" / "plain"), adapter_name="plain")
    ref.base_model.set_adapter(["plain", "default"])
    pm.set_adapter(["plain", "default"])
    _close(_logits(pm), _logits(ref))
    pm.set_adapter(["default", "plain"])
    with pytest.raises(peftfx.ConfigError, match="put the LoRA adapters first"):
        _logits(pm)


def test_dora_refuses_weighted_combination(load_model, tmp_path):
    _, pm = _two_dora_adapters(load_model, tmp_path)
    with pytest.raises(peftfx.ConfigError, match="cannot be combined"):
        pm.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")


# -- export --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("merged", [True, False])
def test_export_equals_eager(name, merged, load_model, tmp_path):
    from peftfx.tools.export import export
    _, pm = _twins(load_model, name, tmp_path)
    want = _logits(pm)
    path = export(pm, str(tmp_path / "model.pt2"), merged=merged)
    module = torch.export.load(path).module()
    with torch.no_grad():
        got = [module(**kw)["logits"] for kw in _inputs()]
    _close(got, want, tol=1e-5 if not merged else 1e-4)
    assert not pm.merged_adapters


def test_unmerged_export_sidecars_carry_fresh_constants(load_model, tmp_path):
    from peftfx.tools.export import load_adapter_into
    ref, pm = _two_dora_adapters(load_model, tmp_path)
    path = peftfx.export(pm, str(tmp_path / "model.pt2"), merged=False)
    module = torch.export.load(path).module()
    load_adapter_into(module, load_file(path + ".adapters/b.safetensors"))
    ref.set_adapter("b")
    with torch.no_grad():
        got = [module(**kw)["logits"] for kw in _inputs()]
    _close(got, _logits(ref))


def test_quantized_base_is_refused_clearly(load_model):
    pytest.importorskip("bitsandbytes")
    pm = peftfx.apply(load_model("llama"), peftfx.LoraConfig(use_dora=True, target_modules=["q_proj"]))
    pm.quantize(peftfx.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    with pytest.raises(peftfx.ConfigError, match="DoRA on a quantized base is not supported"):
        _logits(pm)
