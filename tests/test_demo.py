"""The README's demo runs end to end and its checks hold (they compare against eager PyTorch); its help
names every file it writes, and its closing lines point at files that exist."""
from __future__ import annotations

import os
import pathlib
import urllib.parse

import pytest
import torch

from peftfx.tools import cli
from peftfx.tools.demo import run_demo


def test_demo_trains_saves_draws_exports_and_merges(tmp_path, capsys):
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

    # `peftfx demo --help` names everything the demo wrote.
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for entry in os.listdir(tmp_path):
        name = entry + "/" if os.path.isdir(tmp_path / entry) else entry
        assert name in help_text, f"the demo wrote {name} but its --help does not say so"

    # The closing lines say what to open next, and every path they name exists.
    closing = lines[[i for i, line in enumerate(lines) if line.startswith("done in")][0] + 1 :]
    text = "\n".join(closing)
    assert "in a browser" in text and "graph.py" in text and "model.pt2" in text and "merged" in text
    urls = [word for line in closing for word in line.split() if word.startswith("file://")]
    assert urls, text
    for url in urls:
        assert pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).is_file(), url
    for path in (os.path.join(tmp_path, "graph.py"), result.artifact_path, os.path.join(tmp_path, "merged")):
        assert path in text and os.path.exists(path)
