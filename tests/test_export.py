"""Export: .pt2 artifacts (merged, unmerged, AOTInductor) loaded in a fresh Python process where peftfx
and transformers cannot be imported give the adapted model's outputs; bad input fails cleanly."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import peftfx
from conftest import batch, perturb_trainable
from peftfx.errors import ExportError

TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
SIZES = [(3, 9), (1, 1), (2, 14)]  # the example size, then batch 1 / sequence 1, then a longer one

FRESH_PROCESS = textwrap.dedent("""
    import sys
    sys.modules["peftfx"] = None          # import peftfx -> ImportError
    sys.modules["transformers"] = None    # the artifact needs torch only
    import torch
    from safetensors.torch import load_file
    artifact, inputs_path, out_path, kind, feed = sys.argv[1:6]
    if "bnb" in sys.argv[6:]:
        import bitsandbytes  # noqa: F401  registers torch.ops.bitsandbytes.* for a quantized artifact
    if kind == "aoti":
        module = torch._inductor.aoti_load_package(artifact)
    else:
        module = torch.export.load(artifact).module()
    if feed != "-":                       # docs/export.md: switching adapters of an unmerged artifact
        own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        with torch.no_grad():
            for name, tensor in load_file(feed).items():
                own[name].copy_(tensor)
    outputs = [module(**inputs)["logits"] for inputs in torch.load(inputs_path)]
    torch.save(outputs, out_path)
""")


def _lora(name: str, **extra) -> peftfx.LoraConfig:
    targets = ["c_attn", "c_fc"] if name == "gpt2" else ["query", "value"] if name == "bert" else ["q_proj", "v_proj"]
    fields = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": False, **extra}
    return peftfx.LoraConfig(task_type=TASK[name], **fields)


def _inputs() -> list[dict[str, torch.Tensor]]:
    return [batch(b, s, seed=b + s) for b, s in SIZES]


def _run_fresh(tmp_path, artifact: str, kind: str = "pt2", feed: str = "-", *flags: str) -> list[torch.Tensor]:
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(_inputs(), inputs)
    done = subprocess.run([sys.executable, "-I", str(script), artifact, str(inputs), str(outputs), kind, feed, *flags],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(outputs)


def _expected(pm) -> list[torch.Tensor]:
    with torch.no_grad():
        return [pm(**inputs).logits for inputs in _inputs()]


def _assert_all_close(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [pytest.param("llama", marks=pytest.mark.slow), "gpt2", "bert"])  # llama: demo
def test_merged_artifact_runs_without_peftfx(name, load_model, tmp_path):
    model = load_model(name)
    extra = {"modules_to_save": ["classifier"]} if name == "bert" else {}
    pm = peftfx.apply(model, _lora(name, **extra))
    perturb_trainable(pm, scale=0.5)
    pm.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = peftfx.export(pm, str(tmp_path / "model.pt2"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's weights untouched
    with torch.no_grad(), pm.disable_adapter():
        base = pm(**_inputs()[0]).logits
    pm.merge_adapter()  # the reference: peftfx's own merge (same fold, same fp32 rounding as the artifact's)
    want = _expected(pm)
    pm.unmerge_adapter()
    assert (want[0] - base).abs().max() > 1e-3  # the adapter changes the outputs, so folding is tested
    _assert_all_close(_run_fresh(tmp_path, path), want)
    torch.testing.assert_close(want, _expected(pm), atol=1e-4, rtol=1e-4)  # and merged ≈ unmerged
    program = torch.export.load(path)
    assert not any("lora" in k or "peftfx_slots" in k for k in program.state_dict)  # LoRA folded away
    assert any("modules_to_save" in k for k in program.state_dict) == (name == "bert")  # the trained head
    assert not os.path.exists(path + ".adapters")


@pytest.mark.slow  # three fresh processes; test_cli_export_of_a_saved_adapter covers the unmerged load path
def test_unmerged_artifact_serves_every_adapter_of_its_layout(load_model, tmp_path):
    pm = peftfx.apply(load_model("llama"), _lora("llama"))
    pm.add_adapter("b", _lora("llama", lora_alpha=3))  # same layout, other values and scaling
    pm.add_adapter("wide", peftfx.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False))
    pm.eval()
    path = peftfx.export(pm, str(tmp_path / "model.pt2"), merged=False)
    assert sorted(os.listdir(path + ".adapters")) == ["b.safetensors", "default.safetensors"]
    _assert_all_close(_run_fresh(tmp_path, path), _expected(pm))
    pm.set_adapter("b")
    want_b = _expected(pm)
    _assert_all_close(_run_fresh(tmp_path, path, feed=os.path.join(path + ".adapters", "b.safetensors")), want_b)
    assert any("peftfx_slots" in k for k in torch.export.load(path).state_dict)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_adapters_export(kind, load_model, tmp_path):
    config = (peftfx.PromptTuningConfig if kind == "prompt" else peftfx.PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=3)
    pm = peftfx.apply(load_model("llama"), config)
    perturb_trainable(pm, scale=1.0)
    pm.eval()
    path = peftfx.export(pm, str(tmp_path / "model.pt2"))
    _assert_all_close(_run_fresh(tmp_path, path), _expected(pm))


@pytest.mark.slow
def test_quantized_base_exports_unmerged_and_refuses_merged(load_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    pm = peftfx.apply(load_model("llama"), _lora("llama"),
                      quantization=peftfx.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    pm.eval()
    with pytest.raises(ExportError, match="merged export onto a quantized base is not supported"):
        peftfx.export(pm, str(tmp_path / "merged.pt2"))
    assert not os.path.exists(tmp_path / "merged.pt2")
    path = peftfx.export(pm, str(tmp_path / "model.pt2"), merged=False)
    _assert_all_close(_run_fresh(tmp_path, path, "pt2", "-", "bnb"), _expected(pm))


@pytest.mark.slow  # compiles C++ (about 25 s idle on 2 cores)
def test_aoti_package_runs_without_peftfx(load_model, tmp_path):
    pm = peftfx.apply(load_model("llama"), _lora("llama"))
    pm.eval()
    path = peftfx.export(pm, str(tmp_path / "model.pt2"), aoti=True)
    _assert_all_close(_run_fresh(tmp_path, path, kind="aoti"), _expected(pm))


def test_cli_export_of_a_saved_adapter(load_model, model_dirs, tmp_path):
    from peftfx.tools.cli import main
    pm = peftfx.apply(load_model("gpt2"), _lora("gpt2"))
    pm.save_pretrained(str(tmp_path / "adapter"))
    out = str(tmp_path / "cli.pt2")
    assert main(["export", model_dirs["gpt2"], "--adapter", str(tmp_path / "adapter"), "-o", out]) == 0
    _assert_all_close(_run_fresh(tmp_path, out), _expected(pm.eval()))
    assert main(["export", model_dirs["gpt2"], "--adapter", str(tmp_path / "adapter"),
                 "-o", str(tmp_path / "missing" / "x.pt2")]) == 1


def test_bad_export_requests_fail_clearly_and_leave_nothing(load_model, tmp_path, monkeypatch):
    pm = peftfx.apply(load_model("llama"), _lora("llama"))
    with pytest.raises(ExportError, match="folder .*missing.* does not exist"):
        peftfx.export(pm, str(tmp_path / "missing" / "model.pt2"))
    with pytest.raises(ExportError, match="writes .pt2 files"):
        peftfx.export(pm, str(tmp_path / "model.bin"))
    with pytest.raises(ExportError, match=r"unknown adapter\(s\) \['nope'\]; this model has \['default'\]"):
        peftfx.export(pm, str(tmp_path / "model.pt2"), adapter_names=["nope"])

    def broken_save(program, f):  # fails half way through writing
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    target = tmp_path / "out" / "model.pt2"
    target.parent.mkdir()
    monkeypatch.setattr(torch.export, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        peftfx.export(pm, str(target))
    assert os.listdir(target.parent) == []  # no partial artifact, no temporary file
