"""passes/quantize.py alone on a tiny exported model: rules `linear4bit` and `linear8bit` swap each
quantized linear for bitsandbytes' ops; outputs equal bitsandbytes' own Linear4bit / Linear8bitLt on the
same weights (pinned to bnb's dequantize + matmul path, so no result depends on the host CPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

import peftfx  # noqa: E402
from peftfx.errors import ConfigError  # noqa: E402
from peftfx.passes import modules_to_save, quantize  # noqa: E402
from peftfx.quant_config import QuantConfig  # noqa: E402
from peftfx.state.variants import VariantSpec  # noqa: E402

from .helpers import aten, bnb_dequantize_path, made, ops, run, variant_setup  # noqa: E402

QUANTIZED = ("up", "down")  # head stays in full precision (llm_int8_skip_modules)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64, bias=False)
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def _quantized(config: QuantConfig):
    """(PeftFxModel over a quantized Mlp, the same Mlp with bitsandbytes layers, input, capture)."""
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(3, 5, 64)
    x[..., 3] *= 40  # an outlier feature, which LLM.int8 keeps in full precision above its threshold
    twin = Mlp()
    twin.load_state_dict(model.state_dict())
    for name in QUANTIZED:
        fp = getattr(model, name)
        if config.bits == 4:
            layer = bnb.nn.Linear4bit(fp.in_features, fp.out_features, bias=fp.bias is not None,
                                      compute_dtype=torch.float32, quant_type=config.bnb_4bit_quant_type,
                                      compress_statistics=config.bnb_4bit_use_double_quant)
        else:
            layer = bnb.nn.Linear8bitLt(fp.in_features, fp.out_features, bias=fp.bias is not None,
                                        has_fp16_weights=False, threshold=config.llm_int8_threshold)
        layer.load_state_dict(fp.state_dict())
        setattr(twin, name, layer.to("cpu"))  # .to(device) is where bitsandbytes quantizes
    twin = bnb_dequantize_path(twin)
    pm = peftfx.quantize(model, config, example_inputs=(x,))
    pm.eval()
    pm(x)
    return pm, twin, x, pm.state.captures()[0]


@pytest.fixture(scope="module")
def nf4():
    return _quantized(QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype="float32", llm_int8_skip_modules=["head"]))


@pytest.fixture(scope="module")
def int8():
    return _quantized(QuantConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=["head"]))


def test_linear4bit_runs_dequantize_4bit(nf4):
    pm, twin, x, capture = nf4
    gm, ctx = variant_setup(pm, capture)  # the base variant mounts the quant store too
    assert ctx.quant is pm.state.quant
    assert run(gm, ctx, quantize.PASS) == [len(QUANTIZED)]
    counts = made(gm, "quantize.linear4bit")
    ops4 = torch.ops.bitsandbytes
    assert counts[ops4.dequantize_4bit.default] == len(QUANTIZED)
    assert counts[ops4.dequantize_blockwise.default] == len(QUANTIZED)  # double quantization: absmax of absmax
    assert counts[aten.linear.default] == len(QUANTIZED)
    assert not made(gm, "quantize.linear8bit")
    assert ops(gm, [aten.linear.default])[aten.linear.default] == len(QUANTIZED) + 1  # + the head
    with torch.no_grad():
        assert torch.equal(gm(x), twin.eval()(x))


def test_linear8bit_eval_and_train(int8):
    pm, twin, x, capture = int8
    ops8 = torch.ops.bitsandbytes
    gm, ctx = variant_setup(pm, capture)
    assert run(gm, ctx, quantize.PASS) == [len(QUANTIZED)]
    counts = made(gm, "quantize.linear8bit")
    assert counts[ops8.int8_vectorwise_quant.default] == counts[ops8.int8_mixed_scaled_mm.default] == len(QUANTIZED)
    assert ops(gm, [aten.linear.default])[aten.linear.default] == 1  # only the head is left a linear
    with torch.no_grad():
        assert torch.equal(gm(x), twin.eval()(x))
    # train: bitsandbytes' CPU training path, the int8 rows dequantized into a plain linear
    gm, ctx = variant_setup(pm, capture, training=True)
    assert ctx.training and run(gm, ctx, quantize.PASS) == [len(QUANTIZED)]
    counts = made(gm, "quantize.linear8bit")
    assert counts[aten.linear.default] == len(QUANTIZED) and ops8.int8_vectorwise_quant.default not in counts
    twin.train()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = gm(x1), twin(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-5)


def test_applies_only_with_a_quant_store(nf4):
    pm, _, x, capture = nf4
    gm, ctx = variant_setup(pm, capture, quant=None)
    before = str(gm.graph)
    assert run(gm, ctx, quantize.PASS) == [0] and str(gm.graph) == before


def test_validate_refuses_a_saved_copy_of_a_quantized_module():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    pm = peftfx.quantize(Mlp().eval(), QuantConfig(load_in_4bit=True), example_inputs=(x,))  # head quantized too
    pm.add_adapter("default", peftfx.LoraConfig(r=2, target_modules=["up"], modules_to_save=["head"]))
    capture = pm.state.reference_capture()
    gm, ctx = variant_setup(pm, capture, VariantSpec(saved=("default",)))
    run(gm, ctx, modules_to_save.PASS)
    before = str(gm.graph)
    with pytest.raises(ConfigError, match=r"module 'head' is quantized, so modules_to_save cannot train a copy "
                                          r"of it; keep it in full precision with "
                                          r"QuantConfig\(llm_int8_skip_modules=\['head'\]\)"):
        run(gm, ctx, quantize.PASS)
    assert str(gm.graph) == before  # refused before any node changed
