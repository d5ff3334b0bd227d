"""pm.generate: transformers' GenerationMixin.generate driving the static-cache decode graph. Tokens must equal
HF PEFT's generate for the same adapter weights: LoRA (unmerged, switched, merged, disabled, DoRA, mixed
adapter_names) on Llama and GPT-2, prompt and prefix tuning; greedy, sampling under torch.manual_seed, beam
search, logits processors, stopping criteria, streamers, generation_config, max_length, min_new_tokens,
repetition_penalty, return_dict_in_generate, num_return_sequences, inputs_embeds, and the text-generation
pipeline with beams."""
from __future__ import annotations

import peft
import pytest
import torch
import transformers
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import peftfx
from conftest import CONFIGS, batch, perturb_trainable
from oracle import twin_models
from peftfx.generate import DECODE_MARK
from peftfx.generate_hf import DecodeCache
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


def _lengths(kw):
    """NEW new tokens unless the call sets its length another way."""
    return {} if {"max_length", "generation_config"} & set(kw) else {"max_new_tokens": NEW}


def _peft_generate(ref, **kw):
    kw = {**_lengths(kw), "do_sample": False, **kw}
    with torch.no_grad():
        return ref.generate(**kw)


def _both(ref, pm, **kw):
    """(peftfx's, PEFT's) result of the same generate call; sampling draws after the same manual seed."""
    kw = {**_lengths(kw), **kw}
    torch.manual_seed(5)
    got = pm.generate(**kw)
    torch.manual_seed(5)
    return got, _peft_generate(ref, **kw)


def _decode_captures(pm) -> int:
    return sum(c.signature.inputs[0][0] == DECODE_MARK for c in pm.state.captures())


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lora_twins(request, model_dirs, tmp_path_factory):
    name = request.param
    configs = {"default": dict(r=4, lora_alpha=8, target_modules=TARGETS[name]),
               "b": dict(r=4, lora_alpha=16, target_modules=TARGETS[name])}
    if name == "llama":  # DoRA's eval constants come from before_run, as in the forward
        configs["d"] = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
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


def test_lora_switch_disable_merge_dora_match_peft(lora_twins):
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
        got, want = _both(ref, pm, **padded, num_beams=3)  # beams over merged weights
        assert torch.equal(got, want)
    finally:
        pm.unmerge_adapter()
    if name == "llama":
        ref.set_adapter("d"), pm.set_adapter("d")
        try:
            for kw in ({}, {"num_beams": 2}):
                got, want = _both(ref, pm, **padded, **kw)
                assert torch.equal(got, want), kw
        finally:
            ref.set_adapter("default"), pm.set_adapter("default")
    assert _decode_captures(pm) == 1  # every batch size, beam count, prompt length and state used one capture


def test_mixed_adapter_batch_matches_peft(lora_twins):
    """adapter_names: one decode graph serves rows of different adapters (and the base), as PEFT's
    generate(adapter_names=...) does, beams included (each row's beams keep its adapter)."""
    name, ref, pm = lora_twins
    ref.set_adapter("default"), pm.set_adapter("default")
    padded = batch(3, 7, seed=4)
    names = ["b", "__base__", "default"]
    got = pm.generate(**padded, max_new_tokens=NEW, adapter_names=names)
    assert torch.equal(got, _peft_generate(ref, **padded, adapter_names=names))
    assert not torch.equal(got, pm.generate(**padded, max_new_tokens=NEW))  # the rows really differ
    got, want = _both(ref, pm, **padded, adapter_names=names, num_beams=2)
    assert torch.equal(got, want)
    with pytest.raises(peftfx.ConfigError, match="adapter_names has 2 entries but the batch has 3 rows"):
        pm.generate(**padded, adapter_names=["b", "default"], num_beams=2)
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
    # min_new_tokens holds eos back; beams finish at eos
    for kw in ({"min_new_tokens": 5}, {"num_beams": 3, "num_return_sequences": 2}):
        got, want = _both(ref, pm, **padded, eos_token_id=eos, pad_token_id=0, **kw)
        assert torch.equal(got, want), kw


def test_sampling_draws_as_peft_under_the_same_seed(lora_twins):
    """transformers' sampling (its warpers, torch.multinomial on the global RNG): with the same manual seed
    peftfx and PEFT draw the same tokens; seed= is that seed without moving the caller's RNG."""
    name, ref, pm = lora_twins
    ref.set_adapter("default"), pm.set_adapter("default")
    padded = batch(3, 7)
    options = [dict(temperature=3.0), dict(temperature=2.0, top_k=10, top_p=0.9),
               dict(num_return_sequences=2, temperature=2.0), dict(num_beams=2, temperature=2.0)]
    for kw in options:
        got, want = _both(ref, pm, **padded, do_sample=True, **kw)
        assert torch.equal(got, want), kw
    kw = dict(**padded, max_new_tokens=NEW, do_sample=True, temperature=3.0)
    torch.manual_seed(11)
    seeded = pm.generate(**kw)
    state = torch.get_rng_state()
    assert torch.equal(pm.generate(**kw, seed=11), seeded)
    assert torch.equal(torch.get_rng_state(), state)  # seed= left the global RNG alone
    assert not torch.equal(pm.generate(**kw, seed=12), seeded)
    with pytest.raises(peftfx.ConfigError, match="seed="):
        pm.generate(**kw, generator=torch.Generator())


class _BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -float("inf")
        return scores


class _StopAtLength(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


class _Collect(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


def test_generation_features_match_peft(lora_twins):
    """Logits processors, stopping criteria, a streamer, generation_config, max_length, repetition and
    n-gram penalties, and return_dict_in_generate with scores and logits: all transformers' own code."""
    name, ref, pm = lora_twins
    ref.set_adapter("default"), pm.set_adapter("default")
    padded = batch(2, 6, seed=8)
    greedy = pm.generate(**padded, max_new_tokens=NEW)
    banned = int(greedy[1, 6])
    cases = [
        dict(logits_processor=LogitsProcessorList([_BanToken(banned)])),
        dict(stopping_criteria=StoppingCriteriaList([_StopAtLength(6 + 3)])),
        dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
        dict(max_length=6 + 4),
        dict(generation_config=GenerationConfig(max_new_tokens=5, num_beams=2, repetition_penalty=1.3,
                                                pad_token_id=0, eos_token_id=2)),
    ]
    for kw in cases:
        got, want = _both(ref, pm, **padded, **kw)
        assert torch.equal(got, want), kw
    assert int(_both(ref, pm, **padded, **cases[0])[0][1, 6]) != banned  # the processor really ran
    assert _both(ref, pm, **padded, **cases[1])[0].shape[1] == 6 + 3
    for beams in (1, 3):
        kw = dict(**padded, return_dict_in_generate=True, output_scores=True, output_logits=True, num_beams=beams)
        got, want = _both(ref, pm, **kw)
        assert torch.equal(got.sequences, want.sequences)
        assert type(got) is type(want) and isinstance(got.past_key_values, DecodeCache)
        for ours, theirs in zip(got.scores + got.logits, want.scores + want.logits):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        if beams > 1:
            torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-4, rtol=1e-4)
            assert torch.equal(got.beam_indices, want.beam_indices)
    streamers = _Collect(), _Collect()
    one = padded["input_ids"][1:]
    for model, streamer in zip((pm, ref), streamers):
        out = model.generate(one, max_new_tokens=NEW, do_sample=False, streamer=streamer)
        assert streamer.ended and torch.equal(torch.cat([p.reshape(1, -1) for p in streamer.puts], 1), out)
    assert all(torch.equal(a, b) for a, b in zip(*(s.puts for s in streamers)))


def test_inputs_embeds_match_peft(lora_twins):
    """A prompt given as embeddings: the prefill runs the embeddings capture, later steps the token one."""
    name, ref, pm = lora_twins
    if name != "gpt2":
        pytest.skip("one model is enough: the path is model-independent (GPT-2's capture is the cheaper one)")
    ref.set_adapter("default"), pm.set_adapter("default")
    padded = batch(3, 7, seed=9)
    embeds = pm.get_input_embeddings()(padded["input_ids"]).detach()
    kw = dict(inputs_embeds=embeds, attention_mask=padded["attention_mask"])
    for extra in ({}, {"num_beams": 2}, {"input_ids": padded["input_ids"]}):
        got, want = _both(ref, pm, **kw, **extra)
        assert torch.equal(got, want), extra
    assert torch.equal(got, pm.generate(**padded, max_new_tokens=NEW))  # same tokens as from the ids


def test_text_generation_pipeline_with_beams(lora_twins, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    name, ref, pm = lora_twins
    ref.set_adapter("default"), pm.set_adapter("default")
    words = [chr(97 + i // 26) + chr(97 + i % 26) for i in range(CONFIGS[name][1]().vocab_size)]  # aa, ab, ...
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="ab"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="ab", pad_token="aa")
    prompt = "af br cx bj"
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False)
    got = transformers.pipeline("text-generation", model=pm, tokenizer=tokenizer)(prompt, **kw)
    want = transformers.pipeline("text-generation", model=ref, tokenizer=tokenizer)(prompt, **kw)
    assert len(got) == 2 and got == want
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    ours = transformers.pipeline("text-generation", model=pm, tokenizer=tokenizer)(prompt, return_tensors=True, **kw)
    assert [o["generated_token_ids"] for o in ours] == pm.generate(ids, **kw).tolist()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_matches_peft(name, kind, load_model, tmp_path):
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
    cases = [{"num_beams": 3}]
    if name == "gpt2":  # one model is enough for sampling: the draws do not depend on the architecture
        cases.append({"do_sample": True, "temperature": 2.0, "num_return_sequences": 2})
    for kw in cases:
        ours, theirs = _both(ref, pm, **padded, **kw)
        assert torch.equal(ours, theirs), kw
    with torch.no_grad():  # the virtual tokens really change the tokens (the base model alone differs)
        assert not torch.equal(load_model(name).generate(**padded, max_new_tokens=NEW, do_sample=False), got)
    if kind == "prompt":
        with pytest.raises(peftfx.ConfigError, match="inputs_embeds"):
            pm.generate(inputs_embeds=torch.zeros(1, 3, pm.config.hidden_size))
    with pytest.raises(peftfx.ConfigError, match="prompt-learning"):
        pm.generate(**padded, adapter_names=["default"] * 3)


def test_bad_arguments_raise_clear_errors(lora_twins):
    _, _, pm = lora_twins
    ids = batch(2, 5)["input_ids"]
    with pytest.raises(peftfx.ConfigError, match="attention_mask"):
        pm.generate(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(peftfx.ConfigError, match="input_ids"):
        pm.generate(ids[0])
    with pytest.raises(peftfx.ConfigError, match="assisted_generation"):
        pm.generate(ids, prompt_lookup_num_tokens=2)
    with pytest.raises(peftfx.ConfigError, match="hidden states"):
        pm.generate(ids, return_dict_in_generate=True, output_hidden_states=True)
    with pytest.raises(peftfx.ConfigError, match="past_key_values"):
        pm.generate(ids, past_key_values=transformers.DynamicCache())
    with pytest.raises(ValueError, match="not used by the model"):  # transformers' own check of typos
        pm.generate(ids, max_new_tokns=3)


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
