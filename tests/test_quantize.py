"""The quantize pass alone, against bitsandbytes' own Linear4bit / Linear8bitLt on the same weights."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

import peftfx  # noqa: E402
from peftfx.errors import ConfigError  # noqa: E402
from peftfx.quantize_weights import check_quantizable  # noqa: E402
from peftfx.errors import MissingDependencyError
from peftfx.quant_config import QuantConfig, as_quant_config, require_bitsandbytes  # noqa: E402
from peftfx.quant_store import is_hollow, storage_bytes  # noqa: E402

from conftest import bnb_dequantize_path  # noqa: E402


class Mlp(nn.Module):
    """Two linears (one without bias, one with an odd input width) and a head."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(64, 96, dtype=dtype)
        self.down = nn.Linear(96, 33, bias=False, dtype=dtype)
        self.head = nn.Linear(33, 8, dtype=dtype)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def _bnb_twin(model: Mlp, make_layer, dtype=torch.float32) -> Mlp:
    """The same model with `up` and `down` replaced by bitsandbytes layers quantized from the same weights,
    pinned to bnb's dequantize + matmul path (the one the quantize pass runs) on every CPU."""
    twin = Mlp(dtype)
    twin.load_state_dict(model.state_dict())
    for name in ("up", "down"):
        fp = getattr(model, name)
        layer = make_layer(fp.in_features, fp.out_features, fp.bias is not None)
        layer.load_state_dict(fp.state_dict())
        setattr(twin, name, layer.to("cpu"))  # .to(device) is where bitsandbytes quantizes
    return bnb_dequantize_path(twin)


CASES_4BIT = [("nf4", False, 64), ("nf4", True, 64), ("fp4", False, 128), ("fp4", True, 64), ("nf4", True, 256)]


@pytest.mark.parametrize("quant_type,double,blocksize", CASES_4BIT)
def test_4bit_equals_bnb_linear4bit(quant_type, double, blocksize):
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(3, 5, 64)

    def make(i, o, bias):
        layer = bnb.nn.Linear4bit(i, o, bias=bias, compute_dtype=torch.float32, compress_statistics=double,
                                  quant_type=quant_type)
        layer.weight.blocksize = blocksize
        return layer

    twin = _bnb_twin(model, make).eval()
    config = QuantConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                         bnb_4bit_blocksize=blocksize, bnb_4bit_compute_dtype="float32",
                         llm_int8_skip_modules=["head"])
    pm = peftfx.quantize(model, config, example_inputs=(x,))
    with torch.no_grad():
        want = twin(x)
        got = pm(x)
    assert torch.equal(got, want)
    # same bytes as bitsandbytes' own packing
    assert torch.equal(pm.quant.get("up.weight").packed, twin.up.weight.data.view(torch.uint8))
    # the input gradient flows through a quantized linear, as through bnb's MatMul4Bit
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    pm(x1).square().sum().backward()
    twin(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)


def test_4bit_compute_dtype_and_bf16_model():
    torch.manual_seed(0)
    model, x = Mlp(torch.bfloat16).eval(), torch.randn(2, 7, 64, dtype=torch.bfloat16)

    def make(i, o, bias):
        return bnb.nn.Linear4bit(i, o, bias=bias, compute_dtype=torch.float32, quant_type="nf4",
                                 compress_statistics=False).to(torch.bfloat16)

    twin = _bnb_twin(model, make, torch.bfloat16)
    config = QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                         llm_int8_skip_modules=["head"])
    pm = peftfx.quantize(model, config, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(pm(x), twin.eval()(x))


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_8bit_equals_bnb_linear8bitlt(threshold):
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(3, 5, 64)
    x[..., 3] *= 40  # an outlier feature column, which LLM.int8 keeps in full precision above the threshold
    twin = _bnb_twin(model, lambda i, o, bias: bnb.nn.Linear8bitLt(i, o, bias=bias, has_fp16_weights=False,
                                                                    threshold=threshold))
    config = QuantConfig(load_in_8bit=True, llm_int8_threshold=threshold, llm_int8_skip_modules=["head"])
    pm = peftfx.quantize(model, config, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(pm(x), twin.eval()(x))
    # train mode: bitsandbytes' CPU training path (dequantize + linear), input gradients included
    pm.train(), twin.train()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = pm(x1), twin(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-5)


def test_weights_are_freed_and_bytes_reported():
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(2, 3, 64)
    fp_bytes = sum(getattr(model, n).weight.numel() * 4 for n in ("up", "down"))
    before_all = storage_bytes(model.parameters())
    pm = peftfx.quantize(model, QuantConfig(load_in_4bit=True, llm_int8_skip_modules=["head"]), example_inputs=(x,))
    report = pm.quantization_report
    assert report.linears == 2 and report.bits == 4 and report.skipped == ("head",)
    assert report.bytes_before == fp_bytes
    assert report.bytes_after == pm.quant.nbytes() == storage_bytes(pm.quant.buffers())
    assert report.bytes_after < fp_bytes / 4  # 4 bits per weight plus one float32 absmax per 64 weights
    assert is_hollow(model.up.weight) and is_hollow(model.down.weight) and not is_hollow(model.head.weight)
    assert storage_bytes(model.parameters()) <= before_all - fp_bytes + 8
    assert "quantized 2 linears to 4-bit" in str(report)
    with torch.no_grad():  # the user's model now has no full-precision weights to run with
        assert torch.isnan(model(x)).all()


def test_output_head_is_kept_for_hf_models(load_model):
    pm = peftfx.quantize(load_model("llama"), QuantConfig(load_in_4bit=True))
    assert pm.quantization_report.skipped == ("lm_head",)
    assert pm.quantization_report.linears == 3 * 7


def test_quantized_graph_exports():
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(2, 3, 64)
    pm = peftfx.quantize(model, QuantConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True), example_inputs=(x,))
    gm = pm.graph_module
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "bitsandbytes.dequantize_4bit.default" in targets
    program = torch.export.export(gm, (x,), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), pm(x), rtol=0, atol=0)


# -- configs and errors --------------------------------------------------------------------------------

def test_bitsandbytes_config_is_accepted():
    transformers = pytest.importorskip("transformers")
    hf = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    config = as_quant_config(hf)
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant,
            config.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
    assert as_quant_config(transformers.BitsAndBytesConfig(load_in_8bit=True)).bits == 8


@pytest.mark.parametrize("kwargs,needle", [
    (dict(load_in_4bit=True, bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type='int4'"),
    (dict(load_in_4bit=True, bnb_4bit_blocksize=48), "bnb_4bit_blocksize=48"),
    (dict(), "exactly one of"),
    (dict(load_in_4bit=True, load_in_8bit=True), "exactly one of"),
    (dict(load_in_4bit=True, bnb_4bit_compute_dtype="float64"), "bnb_4bit_compute_dtype"),
    (dict(load_in_8bit=True, llm_int8_has_fp16_weight=True), "llm_int8_has_fp16_weight"),
])
def test_bad_configs_say_what_to_do(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        QuantConfig(**kwargs)


def test_unknown_option_is_refused():
    with pytest.raises(ConfigError, match="bnb_4bit_group"):
        as_quant_config({"load_in_4bit": True, "bnb_4bit_group": 3})


def test_weight_shape_errors():
    config = QuantConfig(load_in_4bit=True)
    with pytest.raises(ConfigError, match="more than bitsandbytes' kernels index"):
        check_quantizable("huge", torch.empty(1 << 16, 1 << 16, device="meta"), config)
    with pytest.raises(ConfigError, match="non-empty 2-D"):
        check_quantizable("empty", torch.empty(0, 8), config)


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'bitsandbytes>=0.50'"):
        require_bitsandbytes()
    with pytest.raises(ImportError, match="pip install"):
        peftfx.quantize(Mlp(), QuantConfig(load_in_4bit=True), example_inputs=(torch.randn(2, 64),))
