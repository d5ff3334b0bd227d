"""Build the same multi-adapter model in HF PEFT and in peftfx, with identical adapter weights."""
from __future__ import annotations

import peft
import torch

import peftfx
from conftest import perturb_trainable


def twin_models(load_model, name: str, configs: dict[str, dict], tmp_path):
    """(peft model, peftfx model) carrying the same adapters: made in PEFT, moved over by checkpoint."""
    names = list(configs)
    ref = peft.get_peft_model(load_model(name), peft.LoraConfig(init_lora_weights=False, **configs[names[0]]))
    for adapter in names[1:]:
        ref.add_adapter(adapter, peft.LoraConfig(init_lora_weights=False, **configs[adapter]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    perturb_trainable(ref)
    ref.save_pretrained(str(tmp_path), selected_adapters=names)
    def folder(adapter):
        return str(tmp_path if adapter == "default" else tmp_path / adapter)

    pm = peftfx.load(load_model(name), folder(names[0]), adapter_name=names[0])
    for adapter in names[1:]:
        pm.load_adapter(folder(adapter), adapter_name=adapter)
    ref.eval(), pm.eval()
    return ref, pm
