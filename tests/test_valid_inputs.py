"""Valid input gives PEFT's output, never a crash: sequences past the position table, GPT-Neo, capture
inside torch.compile, position_ids broadcast over the batch, left padding under prefix/prompt tuning on
models that count positions in the mask, scaled word embeddings; inputs of the wrong shape give a clear
error and change nothing."""
from __future__ import annotations

import copy
import types

import peft
import pytest
import sympy
import torch
import transformers
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.value_ranges import ValueRanges

import peftfx
from peftfx.capture import UNBOUNDED, dim_range, finite_bound
from conftest import VOCAB, batch, perturb_trainable
from oracle import twin_models

LORA = {"default": dict(r=4, target_modules=["q_proj", "v_proj"])}


def _tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama16":  # a position table shorter than the sequences below (rotary runs past it)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16, pad_token_id=0)).eval()
    if kind == "gpt_neo":
        return transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
            vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, window_size=4,
            attention_types=[[["global", "local"], 1]], max_position_embeddings=64)).eval()
    if kind == "opt":
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=64, max_position_embeddings=64, pad_token_id=1)).eval()
    if kind == "biogpt":  # BioGptScaledWordEmbedding: embedding(ids) * sqrt(hidden)
        return transformers.BioGptForCausalLM(transformers.BioGptConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)).eval()
    raise KeyError(kind)


def _twins(base: torch.nn.Module, peft_config, tmp_path):
    """(PEFT model, peftfx model) over copies of `base`, with the same non-default adapter weights."""
    ref = peft.get_peft_model(copy.deepcopy(base), peft_config)
    perturb_trainable(ref, scale=0.5)
    ref.save_pretrained(str(tmp_path))
    pm = peftfx.load(copy.deepcopy(base), str(tmp_path))
    return ref.eval(), pm.eval()


def _same(pm, ref, **kw):
    with torch.no_grad():
        got, want = pm(**kw), ref(**kw)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    if "labels" in kw:
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


def _captures(pm):
    return pm.state.captures()


# -- range constraints with infinite ends -----------------------------------------------------------------

def test_range_bounds_read_every_kind_of_infinity():
    s = sympy.Symbol("s0", integer=True, positive=True)
    for lower, upper, want in [(2, int_oo, (2, UNBOUNDED)), (-int_oo, int_oo, (0, UNBOUNDED)),
                               (1, sympy.oo, (1, UNBOUNDED)), (-sympy.oo, 64, (0, 64)), (1, 16, (1, 16))]:
        program = types.SimpleNamespace(range_constraints={s: ValueRanges(lower, upper)})
        assert dim_range(program, s) == want
    assert finite_bound(sympy.Integer(7)) == 7 and finite_bound(sympy.zoo) is None and finite_bound(int_oo) is None


def test_llama_longer_than_its_position_table_matches_peft(tmp_path):
    ref, pm = _twins(_tiny("llama16"), peft.LoraConfig(init_lora_weights=False, **LORA["default"]), tmp_path)
    _same(pm, ref, **batch(3, 9))
    _same(pm, ref, **batch(2, 24))  # > max_position_embeddings: a capture without that bound
    count = len(_captures(pm))
    _same(pm, ref, **batch(1, 40))
    _same(pm, ref, **batch(3, 5))
    assert len(_captures(pm)) == count  # the long capture serves every longer length; short ones the first


def test_gpt_neo_lora_matches_peft(tmp_path):
    ref, pm = _twins(_tiny("gpt_neo"), peft.LoraConfig(init_lora_weights=False, **LORA["default"]), tmp_path)
    for b, s in [(3, 9), (2, 5), (1, 3)]:
        _same(pm, ref, **batch(b, s))


@pytest.mark.slow  # ~35 s on 2 cores (dynamo + aot_eager)
def test_capture_inside_torch_compile_matches_peft(load_model, tmp_path):
    ref, pm = twin_models(load_model, "llama", LORA, tmp_path)
    compiled = torch.compile(pm, backend="aot_eager")
    kw = batch(3, 9)
    kw["position_ids"] = torch.arange(9).repeat(3, 1)  # a signature not captured yet: dynamo reaches the capture
    before = len(_captures(pm))
    _same(compiled, ref, **kw)
    new = _captures(pm)[before:]
    assert len(new) == 1
    assert new[0].dim_ranges["input_ids"] == ((1, 1 << 16), (1, 128))  # export ran outside dynamo: named Dims
    one = {"input_ids": kw["input_ids"][:1, :1], "attention_mask": kw["attention_mask"][:1, :1],
           "position_ids": kw["position_ids"][:1, :1]}
    _same(compiled, ref, **one)  # batch 1, sequence 1: same capture
    assert len(_captures(pm)) == before + 1


# -- position_ids broadcast over the batch -------------------------------------------------------------------

def test_position_ids_of_batch_one_broadcast_like_peft(load_model, tmp_path):
    ref, pm = twin_models(load_model, "llama", LORA, tmp_path)
    kw = batch(3, 9)
    flipped = torch.arange(9).flip(0)[None]
    _same(pm, ref, **kw, position_ids=flipped.expand(3, 9).clone())   # [3, S]: batch dims tied
    _same(pm, ref, **kw, position_ids=flipped)                        # [1, S] with [3, S]: not that graph
    one = {k: v[:1] for k, v in kw.items()}
    _same(pm, ref, **one, position_ids=flipped)                       # batch 1 everywhere
    _same(pm, ref, **batch(2, 6), position_ids=flipped[:, :6])        # broadcast again, other sizes
    assert len(_captures(pm)) == 3  # the apply-time capture, the tied one and the broadcast one


def test_token_type_ids_of_batch_one_and_class_labels(load_model, tmp_path):
    base = load_model("bert")
    ref, pm = _twins(base, peft.LoraConfig(init_lora_weights=False, task_type="SEQ_CLS", target_modules=["query"]),
                     tmp_path)
    kw = batch(3, 9)
    types_ = torch.zeros(1, 9, dtype=torch.long)
    types_[:, 5:] = 1
    _same(pm, ref, **kw, token_type_ids=types_, labels=torch.tensor([0, 2, 1]))


def test_four_d_attention_mask_and_inputs_embeds_match_peft(load_model, tmp_path):
    ref, pm = twin_models(load_model, "llama", LORA, tmp_path)
    for b, s in [(3, 9), (1, 4), (2, 1)]:
        ids = batch(b, s)["input_ids"]
        mask = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None].expand(b, 1, s, s).clone()
        if s > 2:
            mask[0, :, 2:, :2] = False  # the first row's first two tokens are hidden from the later ones
        _same(pm, ref, input_ids=ids, attention_mask=mask)
    kw = batch(3, 9)
    embeds = ref.get_base_model().get_input_embeddings()(kw["input_ids"]).detach()
    _same(pm, ref, inputs_embeds=embeds, attention_mask=kw["attention_mask"], labels=kw["input_ids"])


# -- prompt learning where positions come from the mask -----------------------------------------------------

@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_opt_left_padding_under_prompt_learning_matches_peft(kind, tmp_path):
    cls = peft.PrefixTuningConfig if kind == "prefix" else peft.PromptTuningConfig
    ref, pm = _twins(_tiny("opt"), cls(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path)
    kw = batch(3, 7)
    kw["attention_mask"][1, :1] = 0  # two rows padded by different amounts
    _same(pm, ref, **kw, labels=kw["input_ids"])
    _same(pm, ref, input_ids=kw["input_ids"])
    _same(pm, ref, **batch(1, 5))


def test_prompt_tuning_scales_embeddings_like_the_model(tmp_path):
    ref, pm = _twins(_tiny("biogpt"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path)
    _same(pm, ref, **batch(3, 7))


# -- wrong shapes ---------------------------------------------------------------------------------------------

def test_wrong_input_shapes_raise_a_clear_error_and_change_nothing(load_model, tmp_path):
    ref, pm = twin_models(load_model, "llama", LORA, tmp_path)
    kw = batch(3, 9)
    _same(pm, ref, **kw)
    captures, last = _captures(pm), pm.state.reference_capture()
    ids = kw["input_ids"]
    bad = [dict(attention_mask=torch.ones(3, 10, dtype=torch.long)), dict(labels=ids[:2]),
           dict(attention_mask=kw["attention_mask"], labels=ids[:, :5]), dict(token_type_ids=ids[:2])]
    for extra in bad:
        with pytest.raises(peftfx.errors.ConfigError) as info:
            pm(input_ids=ids, **extra)
        name, value = next(iter(extra.items())) if len(extra) == 1 else ("labels", extra["labels"])
        assert f"{name} {list(value.shape)}" in str(info.value) and "input_ids [3, 9]" in str(info.value)
    assert _captures(pm) == captures and pm.state.reference_capture() is last
    _same(pm, ref, **kw)
