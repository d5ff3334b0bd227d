"""pm.generate: the static-cache decode graph with LoRA (unmerged, switched, merged, disabled), prompt and
prefix tuning; greedy tokens must equal HF PEFT's generate for the same adapter weights, on one prompt and
on a left-padded batch, with eos/pad handling. Sampling is checked against transformers' own warpers."""
from __future__ import annotations

import peft
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import peftfx
from conftest import CONFIGS, batch, perturb_trainable
from oracle import twin_models
from peftfx.generate import DECODE_MARK, Sampling
from peftfx.rewrite import made_by

NEW = 8
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding runs many tiny ops: on a shared 2-core machine a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loader(model_dirs):
    return lambda name: CONFIGS[name][0].from_pretrained(model_dirs[name]).eval()


def _peft_generate(ref, **kw):
    kw = {"max_new_tokens": NEW, **kw}
    with torch.no_grad():
        return ref.generate(**kw, do_sample=False)


def _decode_captures(pm) -> int:
    return sum(c.signature.inputs[0][0] == DECODE_MARK for c in pm.state.captures())


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lora_twins(request, model_dirs, tmp_path_factory):
    name = request.param
    configs = {"default": dict(r=4, lora_alpha=8, target_modules=TARGETS[name]),
               "b": dict(r=4, lora_alpha=16, target_modules=TARGETS[name])}
    ref, pm = twin_models(_loader(model_dirs), name, configs, tmp_path_factory.mktemp(f"gen-{name}"))
    return name, ref, pm


def test_lora_greedy_matches_peft(lora_twins):
    name, ref, pm = lora_twins
    ref.set_adapter("default"), pm.set_adapter("default")
    padded = batch(3, 7)  # row 0 left-padded
    got = pm.generate(**padded, max_new_tokens=NEW)
    assert got.shape == (3, 7 + NEW)
    assert torch.equal(got, _peft_generate(ref, **padded))
    one = padded["input_ids"][1:2]  # a single prompt, no mask
    assert torch.equal(pm.generate(one, max_new_tokens=NEW), _peft_generate(ref, input_ids=one))
    short = padded["input_ids"][:2, -1:]  # one-token prompts: the prefill is a decode step
    assert torch.equal(pm.generate(short, max_new_tokens=3), _peft_generate(ref, input_ids=short, max_new_tokens=3))
    # the LoRA path really changes the tokens (else this test could not tell adapters apart)
    with pm.disable_adapter():
        base = pm.generate(**padded, max_new_tokens=NEW)
    assert not torch.equal(base, got)
    gm, _ = pm.state.variant(next(c for c in pm.state.captures() if c.signature.inputs[0][0] == DECODE_MARK))
    assert any(made_by(n, "lora.linear") for n in gm.graph.nodes)


def test_lora_switch_disable_merge_match_peft(lora_twins):
    name, ref, pm = lora_twins
    padded = batch(2, 9, seed=3)
    ref.set_adapter("b"), pm.set_adapter("b")
    assert torch.equal(pm.generate(**padded, max_new_tokens=NEW), _peft_generate(ref, **padded))
    with ref.disable_adapter(), pm.disable_adapter():
        assert torch.equal(pm.generate(**padded, max_new_tokens=NEW), _peft_generate(ref, **padded))
    ref.set_adapter("default"), pm.set_adapter("default")
    pm.merge_adapter()
    try:
        assert torch.equal(pm.generate(**padded, max_new_tokens=NEW), _peft_generate(ref, **padded))
    finally:
        pm.unmerge_adapter()
    assert _decode_captures(pm) == 1  # every batch size, prompt length and state used one capture


def test_mixed_adapter_batch_matches_peft(lora_twins):
    """adapter_names: one decode graph serves rows of different adapters (and the base), as PEFT's
    generate(adapter_names=...) does."""
    name, ref, pm = lora_twins
    ref.set_adapter("default"), pm.set_adapter("default")
    padded = batch(3, 7, seed=4)
    names = ["b", "__base__", "default"]
    got = pm.generate(**padded, max_new_tokens=NEW, adapter_names=names)
    assert torch.equal(got, _peft_generate(ref, **padded, adapter_names=names))
    assert not torch.equal(got, pm.generate(**padded, max_new_tokens=NEW))  # the rows really differ
    with pytest.raises(peftfx.ConfigError, match="adapter_names has 2 entries"):
        pm.generate(**padded, adapter_names=["b", "default"])
    with pytest.raises(peftfx.ConfigError, match="unknown adapter"):
        pm.generate(**padded, adapter_names=["b", "nope", "default"])


def test_eos_rows_continue_with_pad_and_stop(lora_twins):
    name, ref, pm = lora_twins
    ref.set_adapter("default"), pm.set_adapter("default")
    padded = batch(3, 7, seed=5)
    free = pm.generate(**padded, max_new_tokens=NEW)
    eos = int(free[0, 7 + 2])  # row 0 emits it at its third new token
    got = pm.generate(**padded, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    want = _peft_generate(ref, **padded, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert (got[0, 7 + 3:] == 0).all()  # after eos: pad
    # every row stops at its first token: the loop ends after one step
    first = sorted({int(t) for t in free[:, 7]})
    got = pm.generate(**padded, max_new_tokens=NEW, eos_token_id=first, pad_token_id=0)
    assert got.shape == (3, 8) and torch.equal(got, _peft_generate(ref, **padded, eos_token_id=first))


def test_sampling_reduces_to_greedy_and_is_reproducible(lora_twins):
    name, ref, pm = lora_twins
    pm.set_adapter("default")
    padded = batch(3, 7)
    greedy = pm.generate(**padded, max_new_tokens=NEW, eos_token_id=[])
    for options in (dict(top_k=1), dict(temperature=1e-4), dict(top_p=1e-6)):
        got = pm.generate(**padded, max_new_tokens=NEW, do_sample=True, seed=11, eos_token_id=[], **options)
        assert torch.equal(got, greedy), options
    sampled = [pm.generate(**padded, max_new_tokens=NEW, do_sample=True, temperature=5.0, eos_token_id=[],
                           generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], sampled[2])
    assert torch.equal(sampled[0], pm.generate(**padded, max_new_tokens=NEW, do_sample=True, temperature=5.0,
                                               eos_token_id=[], seed=1))


def test_sampling_warpers_match_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    for temperature, top_k, top_p in ((0.7, 10, 0.9), (1.3, None, 0.5), (1.0, 5, 1.0), (0.5, 0, 0.3)):
        want = logits.clone()
        if temperature != 1.0:
            want = TemperatureLogitsWarper(temperature)(ids, want)
        if top_k:
            want = TopKLogitsWarper(top_k)(ids, want)
        if top_p < 1.0:
            want = TopPLogitsWarper(top_p)(ids, want)
        got = Sampling(True, temperature, top_k, top_p).warp(logits)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_greedy_matches_peft(name, kind, load_model, tmp_path):
    cls = peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig
    ref = peft.get_peft_model(load_model(name), cls(task_type="CAUSAL_LM", num_virtual_tokens=4))
    perturb_trainable(ref, scale=1.0)
    ref.eval().save_pretrained(str(tmp_path))
    pm = peftfx.load(load_model(name), str(tmp_path))
    padded = batch(3, 7)
    got = pm.generate(**padded, max_new_tokens=NEW)
    assert torch.equal(got, _peft_generate(ref, **padded))
    one = padded["input_ids"][2:3]
    assert torch.equal(pm.generate(one, max_new_tokens=NEW), _peft_generate(ref, input_ids=one))
    with pm.disable_adapter():  # the virtual tokens really change the tokens
        assert not torch.equal(pm.generate(**padded, max_new_tokens=NEW), got)


def test_bad_arguments_raise_clear_errors(lora_twins):
    _, _, pm = lora_twins
    ids = batch(2, 5)["input_ids"]
    with pytest.raises(peftfx.ConfigError, match="num_beams"):
        pm.generate(ids, num_beams=4)
    with pytest.raises(peftfx.ConfigError, match="attention_mask"):
        pm.generate(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(peftfx.ConfigError, match="input_ids"):
        pm.generate(ids[0])
    with pytest.raises(peftfx.ConfigError, match="temperature"):
        pm.generate(ids, do_sample=True, temperature=0.0)
    assert torch.equal(pm.generate(ids, max_new_tokens=0), ids)


@pytest.mark.slow
def test_compiled_generate_matches_peft_and_switches_without_recompiling(model_dirs, tmp_path):
    """pm.compile() then generate: the decode graph runs compiled (inductor), greedy tokens still equal
    PEFT's, and switching to an adapter of the same layout compiles nothing new."""
    import torch._dynamo

    configs = {"default": dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"]),
               "b": dict(r=4, lora_alpha=16, target_modules=TARGETS["llama"])}
    ref, pm = twin_models(_loader(model_dirs), "llama", configs, tmp_path)
    torch._dynamo.reset()
    pm.compile()
    padded = batch(3, 7)
    try:
        for adapter in ("default", "b"):
            ref.set_adapter(adapter), pm.set_adapter(adapter)
            if adapter == "b":
                torch._dynamo.config.error_on_recompile = True
            assert torch.equal(pm.generate(**padded, max_new_tokens=NEW), _peft_generate(ref, **padded)), adapter
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
