"""torch.compile over variants: adapters of one layout share compiled code, so switching recompiles nothing."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import batch
from peftfx.methods.lora import lora_weights
from oracle import twin_models

ADAPTERS = {
    "default": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=20, target_modules=["q_proj", "v_proj"]),  # same layout, other scaling
    "c": dict(r=2, target_modules=["o_proj"]),  # another layout
}


@pytest.fixture
def compiled(load_model, tmp_path):
    ref, pm = twin_models(load_model, "llama", ADAPTERS, tmp_path)
    counter = CompileCounterWithBackend("aot_eager")
    pm.compile(backend=counter)
    return ref, pm, counter


def _states(pm):
    for name in ("default", "b", "c", None):
        if name is None:
            with pm.disable_adapter():
                yield "disabled"
        else:
            pm.set_adapter(name)
            yield name


def test_switching_same_layout_adapters_compiles_nothing(compiled):
    ref, pm, counter = compiled
    kw = batch(2, 8)
    frames = {}
    with torch.no_grad():
        for state in _states(pm):
            pm(**kw)
            frames[state] = counter.frame_count
    assert frames["b"] == frames["default"] > 0  # b has default's layout: it reuses the compiled code
    assert frames["disabled"] > frames["c"] > frames["b"]  # c's layout and the base graph are new
    first_pass = counter.frame_count
    torch._dynamo.config.error_on_recompile = True
    try:
        with torch.no_grad():
            for _ in range(2):
                for state in _states(pm):
                    got = pm(**kw).logits
                    if state == "disabled":
                        with ref.disable_adapter():
                            want = ref(**kw).logits
                    else:
                        ref.set_adapter(state)
                        want = ref(**kw).logits
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            pm(**batch(3, 11))  # another batch and sequence length: dynamic, no recompile
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counter.frame_count == first_pass


def test_compiled_training_step_matches_eager(compiled):
    _, pm, _ = compiled
    pm.set_adapter("default")
    pm.adapters.set_trainable("default", True)
    kw = batch(2, 8)
    pm.train()
    loss = pm(**kw, labels=kw["input_ids"]).loss
    loss.backward()
    a, _ = lora_weights(pm.adapters, "default", "model.layers.0.self_attn.q_proj")
    compiled_grad = a.grad.clone()
    a.grad = None
    pm.state.set_compile(None)  # eager again
    pm(**kw, labels=kw["input_ids"]).loss.backward()
    torch.testing.assert_close(compiled_grad, a.grad, atol=1e-6, rtol=1e-5)
