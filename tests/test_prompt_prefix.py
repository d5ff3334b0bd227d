"""Prompt tuning and prefix tuning against HF PEFT: logits both checkpoint directions, init from text,
training, the state manager, and bad input."""
from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
import transformers

import peftfx
from conftest import CONFIGS, batch, perturb_trainable
from peftfx.rewrite import made_by, provenance_of

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
KINDS = {"prompt": (peft.PromptTuningConfig, peftfx.PromptTuningConfig),
         "prefix": (peft.PrefixTuningConfig, peftfx.PrefixTuningConfig)}


def _kwargs(name: str, b: int = 3, s: int = 7, labels: bool = True, mask: bool = True) -> dict:
    kw = batch(b, s)
    if not mask:
        kw.pop("attention_mask")
    if labels:
        kw["labels"] = kw["input_ids"] if TASK[name] == "CAUSAL_LM" else torch.arange(b) % 3
    return kw


def _peft_model(load_model, name: str, kind: str, **extra):
    cfg = KINDS[kind][0](task_type=TASK[name], num_virtual_tokens=4, **extra)
    ref = peft.get_peft_model(load_model(name), cfg)
    perturb_trainable(ref, scale=1.0)
    return ref.eval()


def _assert_same(pm, ref, kw):
    with torch.no_grad():
        got, want = pm(**kw), ref(**kw)
    assert got.logits.shape == want.logits.shape
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    if "labels" in kw:
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    return got


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_peft_checkpoint_loads_with_same_logits(name, kind, load_model, tmp_path):
    ref = _peft_model(load_model, name, kind)
    ref.save_pretrained(str(tmp_path))
    pm = peftfx.load(load_model(name), str(tmp_path))
    got = _assert_same(pm, ref, _kwargs(name))
    with torch.no_grad():
        base = load_model(name)(**_kwargs(name)).logits
    if TASK[name] == "CAUSAL_LM":
        assert got.logits.shape[1] == (7 + 4 if kind == "prompt" else 7)  # PEFT: logits of length P+L
        base_part = got.logits[:, -7:]
    else:
        base_part = got.logits
    assert (base_part - base).abs().max() > 1e-2  # the virtual tokens really change the output
    # other sizes (batch 1, sequence 1) reuse or add captures and stay equal
    _assert_same(pm, ref, _kwargs(name, b=1, s=1, labels=False))
    _assert_same(pm, ref, _kwargs(name, b=2, s=12))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_peftfx_checkpoint_loads_in_peft_with_same_logits(name, kind, load_model, tmp_path):
    config = KINDS[kind][1](task_type=TASK[name], num_virtual_tokens=3)
    pm = peftfx.apply(load_model(name), config)
    perturb_trainable(pm, scale=1.0)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    saved = json.load(open(os.path.join(tmp_path, "adapter_config.json")))
    assert saved["peft_type"] == KINDS[kind][0]().peft_type.value
    ref = peft.PeftModel.from_pretrained(load_model(name), str(tmp_path)).eval()
    _assert_same(pm, ref, _kwargs(name))


def test_prefix_uses_key_value_heads_under_grouped_query_attention(load_model, tmp_path):
    llama = load_model("llama")
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    pm = peftfx.apply(llama, peftfx.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    config = pm.peft_config["default"]
    head_dim = llama.config.hidden_size // llama.config.num_attention_heads
    assert (config.num_attention_heads, config.token_dim) == (2, 2 * head_dim)
    weight = pm.adapters.prompts["default"].embedding.weight
    assert weight.shape == (5, llama.config.num_hidden_layers * 2 * 2 * head_dim)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_no_attention_mask_and_inputs_embeds_match_peft(kind, load_model, tmp_path):
    ref = _peft_model(load_model, "llama", kind)
    ref.save_pretrained(str(tmp_path))
    pm = peftfx.load(load_model("llama"), str(tmp_path))
    _assert_same(pm, ref, _kwargs("llama", mask=False))
    kw = _kwargs("llama", labels=False)
    embeds = {"inputs_embeds": ref.get_base_model().get_input_embeddings()(kw["input_ids"]),
              "attention_mask": kw["attention_mask"]}
    _assert_same(pm, ref, embeds)


@pytest.mark.slow
def test_prefix_projection_trains_the_mlp_and_saves_its_output(load_model, tmp_path):
    ref = _peft_model(load_model, "llama", "prefix", prefix_projection=True, encoder_hidden_size=24)
    ref.save_pretrained(str(tmp_path / "peft"))
    pm = peftfx.load(load_model("llama"), str(tmp_path / "peft"))
    _assert_same(pm, ref, _kwargs("llama"))

    # made in peftfx: the MLP is in the graph while training, and the file holds its output
    pm = peftfx.apply(load_model("llama"), peftfx.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=24))
    perturb_trainable(pm, scale=0.5)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("transform" in n for n in trainable) and any("embedding" in n for n in trainable)
    pm.train()
    pm(**_kwargs("llama")).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if p.requires_grad)
    assert any(n.target == torch.ops.aten.tanh.default for n in pm.graph_module.graph.nodes)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "fx"))
    back = peft.PeftModel.from_pretrained(load_model("llama"), str(tmp_path / "fx")).eval()
    _assert_same(pm, back, _kwargs("llama"))


def _tiny_tokenizer(folder) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[PAD]", "[UNK]", "classify", "the", "sentiment", "of", "this", "review"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]") \
        .save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("tokens", [3, 11])  # text of 4 tokens: cut, and repeated
def test_prompt_init_from_text_equals_peft(tokens, load_model, tmp_path):
    fields = dict(task_type="CAUSAL_LM", num_virtual_tokens=tokens, prompt_tuning_init="TEXT",
                  prompt_tuning_init_text="classify the sentiment review",
                  tokenizer_name_or_path=_tiny_tokenizer(tmp_path / "tok"))
    ref = peft.get_peft_model(load_model("llama"), peft.PromptTuningConfig(**fields))
    pm = peftfx.apply(load_model("llama"), peftfx.PromptTuningConfig(**fields))
    want = ref.prompt_encoder["default"].embedding.weight
    got = pm.adapters.prompts["default"].embedding.weight
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    rows = pm.base_model.get_input_embeddings().weight
    torch.testing.assert_close(got[0], rows[2])  # "classify" is token 2


@pytest.mark.parametrize("name,kind", [("llama", "prompt"), ("gpt2", "prefix"), ("bert", "prompt")])
def test_training_moves_only_virtual_tokens(name, kind, load_model):
    torch.manual_seed(0)  # the virtual tokens' init and dropout: the same run whatever ran before
    model = load_model(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = peftfx.apply(model, KINDS[kind][1](task_type=TASK[name], num_virtual_tokens=4))
    ref = peft.get_peft_model(load_model(name), KINDS[kind][0](task_type=TASK[name], num_virtual_tokens=4))
    assert pm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    kw = _kwargs(name, b=4, s=8)
    if TASK[name] != "CAUSAL_LM":
        # One class for every row, a target training can reach. With labels [0, 1, 2, 0] rows the tiny model
        # cannot tell apart bottom out at 1.04 (the labels' entropy), only 0.04-0.06 under the start loss.
        kw["labels"] = torch.ones(4, dtype=torch.long)

    def eval_loss() -> float:  # eval mode: no dropout noise in the comparison
        pm.eval()
        with torch.no_grad():
            return pm(**kw).loss.item()

    start = eval_loss()
    pm.train()
    for _ in range(8):
        pm(**kw).loss.backward()
        opt.step()
        opt.zero_grad()
    assert eval_loss() < start - 0.05
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_state_manager_switches_disables_and_deletes_prompt_adapters(load_model, tmp_path):
    refs = {}
    for adapter, tokens in (("default", 3), ("b", 5)):
        refs[adapter] = _peft_model(load_model, "gpt2", "prefix" if adapter == "b" else "prompt")
        refs[adapter].save_pretrained(str(tmp_path / adapter))
    pm = peftfx.load(load_model("gpt2"), str(tmp_path / "default"))
    with pytest.raises(peftfx.ConfigError, match="cannot add a PREFIX_TUNING adapter"):
        pm.load_adapter(str(tmp_path / "b"), "b")
    # two prompt adapters: switch, disable, delete
    other = _peft_model(load_model, "gpt2", "prompt")
    other.save_pretrained(str(tmp_path / "c"))
    pm.load_adapter(str(tmp_path / "c"), "c")
    kw = _kwargs("gpt2")
    _assert_same(pm, refs["default"], kw)
    pm.set_adapter("c")
    _assert_same(pm, other, kw)
    with pm.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(pm(**kw).logits, load_model("gpt2")(**kw).logits, atol=0, rtol=0)
    with pytest.raises(peftfx.ConfigError, match="one at a time"):
        pm.set_adapter(["default", "c"])
    with pytest.raises(peftfx.ConfigError, match="cannot be merged"):
        pm.merge_adapter()
    with pytest.raises(peftfx.ConfigError, match="does not work with prompt-learning adapters"):
        pm(**kw, adapter_names=["c", "c", "c"])
    pm.delete_adapter("c")
    assert pm.active_adapters == ["default"]
    _assert_same(pm, refs["default"], kw)


def test_bad_prompt_configs_are_refused(load_model, tmp_path):
    with pytest.raises(peftfx.ConfigError, match="num_virtual_tokens must be a positive integer"):
        peftfx.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=0)
    with pytest.raises(peftfx.ConfigError, match="num_virtual_tokens must be a positive integer"):
        peftfx.PrefixTuningConfig(task_type="CAUSAL_LM")
    with pytest.raises(peftfx.ConfigError, match="needs tokenizer_name_or_path"):
        peftfx.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text="hello")
    with pytest.raises(peftfx.ConfigError, match="task_type=None is not supported"):
        peftfx.apply(load_model("llama"), peftfx.PromptTuningConfig(num_virtual_tokens=2))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_prefix_matches_peft_under_eager_attention(name, model_dirs, tmp_path):
    """attn_implementation='eager' has no attention op: the pass rewrites the softmax(q·kᵀ)·v pattern."""
    def eager():
        return CONFIGS[name][0].from_pretrained(model_dirs[name], attn_implementation="eager").eval()
    ref = peft.get_peft_model(eager(), peft.PrefixTuningConfig(task_type=TASK[name], num_virtual_tokens=4))
    perturb_trainable(ref, scale=1.0)
    ref.eval().save_pretrained(str(tmp_path))
    pm = peftfx.load(eager(), str(tmp_path))
    assert not any("scaled_dot_product" in str(n.target) for n in pm.graph_module.graph.nodes)
    stamped = [n for n in pm.graph_module.graph.nodes
               if made_by(n, "prefix.eager_attention")]
    assert stamped
    _assert_same(pm, ref, _kwargs(name))
    _assert_same(pm, ref, _kwargs(name, b=1, s=1, labels=False))


def test_prefix_refuses_a_layer_count_it_cannot_find(load_model):
    pm = peftfx.apply(load_model("llama"),
                      peftfx.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_layers=5))
    with pytest.raises(peftfx.ConfigError, match="found 3 attention layers .*num_layers=5"):
        pm(**_kwargs("llama"))


def test_encoder_decoder_models_are_refused_clearly():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4))
    with pytest.raises(peftfx.ConfigError, match="encoder-decoder models .*not supported yet"):
        peftfx.apply(t5, peftfx.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


def test_graph_shows_the_prompt_rewrite(load_model):
    pm = peftfx.apply(load_model("llama"), peftfx.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    gm = pm.graph_module
    inputs = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert "input_ids" in inputs and "inputs_embeds" not in inputs
    stamped = {p.qualified for p in map(provenance_of, gm.graph.nodes) if p is not None}
    assert {"prompt.embeds", "prompt.mask"} <= stamped
    copy.deepcopy(pm.peft_config["default"])  # configs stay plain dataclasses
