"""QLoRA: LoRA on a bitsandbytes-quantized base, against HF PEFT on transformers' quantized model.

The PEFT side is what a user runs: `from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`
(bitsandbytes' Linear4bit / Linear8bitLt layers, on CPU) wrapped by `peft.get_peft_model`. peftfx gets
the same quantized model either by capturing transformers' quantized model (its bnb layers adopted as
buffers, no dequantizing) or by quantizing the full-precision checkpoint itself with the quantize pass,
which packs the same bytes.
"""
from __future__ import annotations

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftfx  # noqa: E402
from peftfx.errors import ConfigError  # noqa: E402
from peftfx.quant_store import is_hollow  # noqa: E402

from conftest import CONFIGS, batch, bnb_dequantize_path  # noqa: E402

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.float32)
INT8 = dict(load_in_8bit=True)
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
RTOL = 1e-4  # the acceptance bound (relative to the largest logit); the kernels are the same, so in practice 0


def quantized(model_dirs, name: str, bits: dict, pin: bool = True) -> torch.nn.Module:
    """transformers' quantized model; `pin`: its 4-bit layers run bnb's dequantize + matmul path on every
    CPU (references must not depend on the host; peftfx adopts the layers before any of them runs)."""
    cls = CONFIGS[name][0]
    model = cls.from_pretrained(model_dirs[name], quantization_config=transformers.BitsAndBytesConfig(**bits),
                                device_map="cpu").eval()
    return bnb_dequantize_path(model) if pin else model


def full_precision(model_dirs, name: str) -> torch.nn.Module:
    return CONFIGS[name][0].from_pretrained(model_dirs[name]).eval()


def peft_qlora(model_dirs, bits: dict, name: str = "llama"):
    """PEFT's QLoRA on transformers' quantized model, with non-trivial adapter weights."""
    torch.manual_seed(0)
    ref = peft.get_peft_model(quantized(model_dirs, name, bits), peft.LoraConfig(init_lora_weights=False, **LORA))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return ref.eval()


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> float:
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= rtol, f"relative difference {rel:.3g} > {rtol}"
    return rel


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("bits,route", [(NF4, "adopt"), (NF4, "pass"), (INT8, "adopt"), (INT8, "pass")],
                         ids=["nf4-adopt", "nf4-pass", "int8-adopt", "int8-pass"])
def test_peft_checkpoint_into_peftfx(model_dirs, tmp_path, bits, route):
    ref = peft_qlora(model_dirs, bits)
    ref.save_pretrained(str(tmp_path))
    if route == "adopt":  # transformers' quantized model, captured without dequantizing
        pm = peftfx.load(quantized(model_dirs, "llama", bits), str(tmp_path))
    else:  # the full-precision checkpoint, quantized by peftfx's pass
        pm = peftfx.load(full_precision(model_dirs, "llama"), str(tmp_path),
                         quantization=transformers.BitsAndBytesConfig(**bits))
    inputs = batch()
    assert_close_rel(logits(pm, inputs), logits(ref, inputs))
    with pm.disable_adapter(), ref.disable_adapter():
        assert_close_rel(logits(pm, inputs), logits(ref, inputs))


@pytest.mark.parametrize("bits", [NF4, INT8], ids=["nf4", "int8"])
def test_peftfx_checkpoint_into_peft(model_dirs, tmp_path, bits):
    pm = peftfx.apply(quantized(model_dirs, "llama", bits), peftfx.LoraConfig(init_lora_weights=False, **LORA))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval().save_pretrained(str(tmp_path))
    ref = peft.PeftModel.from_pretrained(quantized(model_dirs, "llama", bits), str(tmp_path)).eval()
    inputs = batch()
    assert_close_rel(logits(pm, inputs), logits(ref, inputs))


def test_qlora_training_matches_peft(model_dirs, tmp_path):
    """Train mode on CPU: same loss and same adapter gradients as PEFT; only adapters get gradients."""
    ref = peft_qlora(model_dirs, NF4)
    ref.save_pretrained(str(tmp_path))
    pm = peftfx.load(quantized(model_dirs, "llama", NF4), str(tmp_path), is_trainable=True)
    ref.train(), pm.train()
    inputs = batch(b=2, s=7)
    want = ref(**inputs, labels=inputs["input_ids"])
    want.loss.backward()
    ref_grads = {n.removeprefix("base_model.model."): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    # unfused, peftfx runs PEFT's kernels in PEFT's order: equal to fp32 round-off. Fused (the default),
    # sums run in another order (one matmul over cat(A_q, A_k, A_v), B * scaling first): within 1e-5.
    for fusion, rtol, atol in ((False, 1e-4, 1e-6), (True, 1e-5, 1e-5)):
        pm.fusion = fusion
        pm.zero_grad(set_to_none=True)
        out = pm(**inputs, labels=inputs["input_ids"])
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
        out.loss.backward()
        ours = {n.removeprefix("adapters."): p for n, p in pm.named_parameters() if p.requires_grad}
        assert set(ours) == set(ref_grads) and all("lora_" in n for n in ours)
        for n, p in ours.items():
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=rtol, atol=atol, msg=f"{n}, fusion={fusion}")
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)
    assert all(not b.requires_grad for b in pm.quant.buffers())
    # a few steps of training lower the loss
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    first = out.loss.item()
    for _ in range(2):
        optimizer.step(), optimizer.zero_grad()
        loss = pm(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
    assert loss.item() < first


def test_capture_keeps_transformers_bytes(model_dirs):
    """Adopting transformers' bnb layers shares their packed bytes: nothing is dequantized or copied."""
    model = quantized(model_dirs, "llama", NF4)
    packed = model.model.layers[0].self_attn.q_proj.weight.data
    pm = peftfx.apply(model, peftfx.LoraConfig(**LORA))
    stored = pm.quant.get("model.layers.0.self_attn.q_proj.weight").packed
    assert stored.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    assert is_hollow(model.model.layers[0].self_attn.q_proj.weight)
    assert all(not type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def dequantized_twin(model_dirs, model: torch.nn.Module, absmax_of=None) -> torch.nn.Module:
    """The full-precision model with each 4-bit weight of `model` replaced by its dequantization (bnb's op):
    dequantize-then-matmul, which no bnb kernel choice enters. `absmax_of(path, layer)` may give a layer's
    absmax (float32, one per block) instead of the one in its state."""
    twin = full_precision(model_dirs, "llama")
    with torch.no_grad():
        for path, layer in model.named_modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                state = layer.weight.quant_state
                absmax = absmax_of(path, layer) if absmax_of else None
                if absmax is None:
                    weight = bnb.functional.dequantize_4bit(layer.weight.data, state)
                else:
                    weight = torch.ops.bitsandbytes.dequantize_4bit(layer.weight.data, absmax, state.blocksize,
                                                                    state.quant_type, list(state.shape), state.dtype)
                twin.get_submodule(path).weight.copy_(weight)
    return twin


def test_capture_does_not_depend_on_bnbs_cpu_kernel(model_dirs):
    """transformers' 4-bit model with its layers set to take bnb's AVX512-BF16 path, as they are on such a CPU
    (bnb's own flag, forced here so the test means the same on every CPU): peftfx adopts the layers before
    anything runs them, so capture and the eval forward under no_grad run dequantize-then-matmul and equal it,
    down_proj (in_features 96, which the packed kernel cannot take) included; no layer gets repacked."""
    model = quantized(model_dirs, "llama", NF4, pin=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(m.in_features % m.weight.quant_state.blocksize for m in layers)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    reference = dequantized_twin(model_dirs, model)
    pm = peftfx.apply(model, peftfx.LoraConfig(**LORA)).eval()
    inputs = batch()
    assert_close_rel(logits(pm, inputs), logits(reference, inputs))
    with pm.disable_adapter():
        assert_close_rel(logits(pm, inputs), logits(reference, inputs))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(weight.nested for _, weight in pm.quant.items())  # adopted as transformers quantized them


@pytest.mark.parametrize("double", [True, False], ids=["double-quant", "plain-absmax"])
def test_adopts_layers_bnb_already_repacked(model_dirs, double):
    """Run eagerly in eval under no_grad on an AVX512-BF16 CPU, bnb repacks each layer in place for its bf16
    kernel: the codes re-laid, absmax (dequantized if nested) rounded to bf16. Adopted afterwards, the layers give
    dequantize-then-matmul over the same codes and that bf16 absmax. The repacking is bnb's own function,
    called directly so the test runs on any CPU; layers the packed kernel refuses (in_features 96) stay."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_blockwise
    model = quantized(model_dirs, "llama", {**NF4, "bnb_4bit_use_double_quant": double}, pin=False)
    rounded = {}
    for path, layer in model.named_modules():
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if (isinstance(layer, bnb.nn.Linear4bit) and layer.in_features % state.blocksize == 0
                and layer.out_features % 32 == 0):
            absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset if double else state.absmax
            rounded[path] = absmax.to(torch.bfloat16).float()
    reference = dequantized_twin(model_dirs, model, lambda path, layer: rounded.get(path))
    for path in rounded:
        layer = model.get_submodule(path)
        layer.weight.data, _ = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert 0 < len(rounded) < 3 * 7
    pm = peftfx.apply(model, peftfx.LoraConfig(**LORA)).eval()
    inputs = batch()
    assert_close_rel(logits(pm, inputs), logits(reference, inputs))
    assert not pm.quant.get("model.layers.0.self_attn.q_proj.weight").nested  # packing dropped double quant
    assert pm.quant.get("model.layers.0.mlp.down_proj.weight").nested == double  # never repacked


@pytest.mark.parametrize("double", [True, False], ids=["double-quant", "plain-absmax"])
def test_adopted_repacked_weight_keeps_block_order(double):
    """Several absmax blocks per row (in_features 192, blocksize 64): the packed layout stores absmax
    transposed, and adoption must give each block its own scale back (the Llama above has one block per row)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit
    from peftfx.bnb_capture import adopt_bnb_modules
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(192, 64, bias=False, compute_dtype=torch.float32, compress_statistics=double,
                              quant_type="nf4").to("cpu")
    state = layer.weight.quant_state
    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset if double else state.absmax
    want = torch.ops.bitsandbytes.dequantize_4bit(layer.weight.data, absmax.to(torch.bfloat16).float(), 64, "nf4",
                                                  [64, 192], torch.float32)
    assert not torch.equal(want, dequantize_4bit(layer.weight.data, state))  # the bf16 rounding is visible
    layer.weight.data, _ = _convert_weight_packed_for_cpu(layer.weight.data, state)
    model = torch.nn.Sequential(layer)
    store = adopt_bnb_modules(model)
    assert torch.equal(store.get("0.weight").dequantize(), want)


def test_merge_requantizes_like_peft(model_dirs, tmp_path):
    """merge_adapter on a 4-bit base: dequantize, add, requantize (a warning says so). PEFT's bnb merge
    does the same; the merged logits agree with PEFT's, and the change against the unmerged adapter
    (rounding of requantizing) is reported."""
    ref = peft_qlora(model_dirs, NF4)
    ref.save_pretrained(str(tmp_path))
    pm = peftfx.load(quantized(model_dirs, "llama", NF4), str(tmp_path))
    inputs = batch()
    unmerged = logits(pm, inputs)
    with pytest.warns(UserWarning, match="quantized base"):
        pm.merge_adapter()
    merged = logits(pm, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = logits(ref.merge_and_unload(), inputs)
    rel = assert_close_rel(merged, peft_merged)
    change = ((merged - unmerged).abs().max() / unmerged.abs().max()).item()
    fp_model = full_precision(model_dirs, "llama")
    quant_error = ((logits(fp_model, inputs) - logits(quantized(model_dirs, "llama", NF4), inputs)).abs().max()
                   / logits(fp_model, inputs).abs().max()).item()
    print(f"\nmerge onto nf4: logits change {change:.3g} vs the unmerged adapter (relative to the largest logit); "
          f"quantizing the base itself changes them by {quant_error:.3g}; merged vs PEFT's merge: {rel:.3g}")
    assert change > 0  # requantizing rounds: that is what the warning is about
    with pytest.warns(UserWarning, match="quantized base"):
        pm.unmerge_adapter()


def test_merge_and_unload_dequantize(model_dirs, tmp_path):
    """dequantize=True: a full-precision model whose merged weights give the QLoRA model's outputs."""
    ref = peft_qlora(model_dirs, NF4)
    ref.save_pretrained(str(tmp_path))
    pm = peftfx.load(quantized(model_dirs, "llama", NF4), str(tmp_path))
    inputs = batch()
    qlora = logits(pm, inputs)
    plain = pm.merge_and_unload(dequantize=True)
    q_proj = plain.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and not is_hollow(q_proj.weight)
    assert q_proj.weight.dtype == torch.float32
    assert_close_rel(logits(plain, inputs), qlora, rtol=1e-5)


def test_unload_gives_bitsandbytes_layers(model_dirs, tmp_path):
    ref = peft_qlora(model_dirs, NF4)
    ref.save_pretrained(str(tmp_path))
    pm = peftfx.load(quantized(model_dirs, "llama", NF4), str(tmp_path))
    inputs = batch()
    with pm.disable_adapter():
        base = logits(pm, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = pm.unload()
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not any(m.training for m in model.modules())  # the user's eval model comes back in eval mode
    assert torch.equal(logits(bnb_dequantize_path(model), inputs), base)


def test_merge_and_unload_quantized(model_dirs, tmp_path):
    ref = peft_qlora(model_dirs, NF4)
    ref.save_pretrained(str(tmp_path))
    pm = peftfx.load(full_precision(model_dirs, "llama"), str(tmp_path), quantization=peftfx.QuantConfig(**NF4))
    inputs = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
        merged = logits(pm, inputs)
        model = pm.merge_and_unload()
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    assert torch.equal(logits(bnb_dequantize_path(model), inputs), merged)


def test_modules_to_save_on_quantized_module_is_refused(model_dirs):
    pm = peftfx.apply(full_precision(model_dirs, "llama"), peftfx.LoraConfig(r=4, target_modules=["q_proj"],
                                                                             modules_to_save=["down_proj"]),
                      quantization=peftfx.QuantConfig(**NF4))
    with pytest.raises(ConfigError, match="llm_int8_skip_modules"):
        pm(**batch())


@pytest.mark.slow
def test_qlora_compiles(model_dirs):
    pm = peftfx.apply(full_precision(model_dirs, "llama"), peftfx.LoraConfig(init_lora_weights=False, **LORA),
                      quantization=peftfx.QuantConfig(**NF4))
    inputs = batch()
    eager = logits(pm, inputs)
    pm.compile()
    torch.testing.assert_close(logits(pm, inputs), eager, rtol=1e-4, atol=1e-5)
    pm.train()
    pm(**inputs, labels=inputs["input_ids"]).loss.backward()


def test_mixed_batch_on_quantized_base(model_dirs):
    """One adapter per row over the quantized base equals running each row's adapter alone."""
    pm = peftfx.apply(full_precision(model_dirs, "llama"), peftfx.LoraConfig(init_lora_weights=False, **LORA),
                      quantization=peftfx.QuantConfig(**NF4))
    pm.add_adapter("other", peftfx.LoraConfig(init_lora_weights=False, r=2, target_modules=["q_proj", "v_proj"]))
    inputs = batch(b=3)
    rows = ["default", "__base__", "other"]
    with torch.no_grad():
        mixed = pm(**inputs, adapter_names=rows).logits
    for i, name in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        if name == "__base__":
            with pm.disable_adapter():
                alone = logits(pm, one)
        else:
            pm.set_adapter(name)
            alone = logits(pm, one)
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)
