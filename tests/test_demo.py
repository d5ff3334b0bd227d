"""The README's demo runs end to end and its checks hold (they compare against eager PyTorch)."""
from __future__ import annotations

import os

import torch

from peftfx.tools.demo import run_demo


def test_demo_trains_saves_draws_exports_and_merges(tmp_path):
    lines = []
    result = run_demo(steps=4, out=str(tmp_path), log=lines.append)
    assert result.last_loss < result.first_loss
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(result.adapter_files)
    assert result.reload_max_abs_diff <= 1e-5 and result.artifact_max_abs_diff <= 1e-4  # merged: fp32 rounding
    assert result.lora_nodes > 0 and all(os.path.getsize(p) > 0 for p in result.drawings)
    program = torch.export.load(result.artifact_path)
    assert not any("lora" in name or "slots" in name for name in program.state_dict)  # merged artifact
    assert os.path.isfile(os.path.join(tmp_path, "merged", "config.json"))
    assert any(line.startswith("[10/10]") for line in lines)
