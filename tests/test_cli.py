"""The command line as a newcomer meets it (help with examples, export --config, formats checked before
anything loads), progress through logging and tqdm, the shared atomic write, and no torch deprecation
noise from peftfx's own calls."""
from __future__ import annotations

import json
import logging
import os
import stat
import warnings

import pytest
import torch
import transformers

import peftfx
from peftfx import progress
from peftfx.save_store import atomic_write, umask
from peftfx.tools import cli
from peftfx.tools.cli import common

LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False}


def _tiny_llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                    architectures=["LlamaForCausalLM"])


@pytest.fixture
def config_dir(tmp_path):
    folder = tmp_path / "config"
    _tiny_llama_config().save_pretrained(folder)
    return str(folder)


def _tiny_pm() -> peftfx.PeftFxModel:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_llama_config()).eval()
    return peftfx.apply(model, peftfx.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))


def _ids() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# -- help -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *(c.__name__.rsplit(".", 1)[1] for c in cli.COMMANDS)])
def test_every_help_shows_example_command_lines(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "examples:\n" in help_text, help_text
    lines = [line.strip() for line in help_text.split("examples:\n", 1)[1].splitlines() if line.startswith("  ")]
    assert lines and all(line.startswith(f"peftfx {command or ''}") for line in lines), help_text
    for line in lines:  # every example parses: an example argparse rejects would mislead
        if "'" not in line:  # (inline JSON is quoted for the shell)
            argv = line.split()[1:]
            assert cli.build_parser().parse_args(argv).command == argv[0]


# -- formats and paths are checked before the model is loaded ---------------------------------------------


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the output path was checked")


def test_viz_refuses_an_unknown_format_before_loading_the_model(config_dir, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", _no_model)
    code = cli.main(["viz", config_dir, "--random-init", "--config", json.dumps(LORA), "-o", "graph.jpg"])
    err = capsys.readouterr().err
    assert code == 1
    assert "graph.jpg" in err and ".svg" in err and ".html" in err


def test_export_refuses_a_bad_path_before_loading_the_model(config_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", _no_model)
    assert cli.main(["export", config_dir, "--random-init", "--config", json.dumps(LORA),
                     "-o", str(tmp_path / "model.bin")]) == 1
    assert "writes .pt2 files" in capsys.readouterr().err
    assert cli.main(["export", config_dir, "--random-init", "--config", json.dumps(LORA),
                     "-o", str(tmp_path / "missing" / "model.pt2")]) == 1
    assert "does not exist" in capsys.readouterr().err


# -- export --config ----------------------------------------------------------------------------------------


def test_export_with_a_config_writes_the_adapted_model(config_dir, tmp_path, capsys, monkeypatch):
    """`export --config` adds a new adapter as `viz --config` does; the artifact computes what HF PEFT
    computes with that adapter's weights on the same base model."""
    from peft import PeftModel

    made = []
    real = common.adapted_model
    monkeypatch.setattr("peftfx.tools.cli.export.adapted_model", lambda args: made.append(real(args)) or made[-1])
    lora_file = tmp_path / "lora.json"
    lora_file.write_text(json.dumps(LORA))
    out = str(tmp_path / "model.pt2")
    assert cli.main(["export", config_dir, "--random-init", "--config", str(lora_file), "-o", out]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out
    assert "exporting the merged graph" in captured.err  # progress through logging, on stderr

    made[0].save_pretrained(str(tmp_path / "adapter"))  # the adapter the command made, read by PEFT
    reference = PeftModel.from_pretrained(common.load_model(config_dir, True), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = torch.export.load(out).module()(**_ids())["logits"]
        want = reference(**_ids()).logits
        with reference.disable_adapter():
            base_logits = reference(**_ids()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - base_logits).abs().max() > 1e-3  # the adapter changes the output: the check can fail


# -- progress: log records and bars -----------------------------------------------------------------------


def test_capture_and_merge_log_what_they_do(caplog, monkeypatch):
    monkeypatch.setattr(progress, "SLOW_S", 0.0)  # every step counts as slow: its duration is logged
    caplog.set_level(logging.INFO, logger="peftfx")
    pm = _tiny_pm()
    captures = [r for r in caplog.records if r.name == "peftfx.capture"]
    assert captures[0].getMessage() == (
        "capturing LlamaForCausalLM with torch.export (eval; inputs input_ids, attention_mask) ...")
    assert any("done in" in r.getMessage() and r.levelno == logging.INFO for r in captures)

    caplog.clear()
    sites = len(pm.adapters.sites["default"])
    pm.merge_and_unload()
    merges = [r.getMessage() for r in caplog.records if r.name == "peftfx.merge"]
    assert merges[0] == f"merging ['default'] into {sites} weights ..." and sites == 2


def test_slow_steps_log_their_duration_only(caplog):
    log = progress.get_logger("test")
    caplog.set_level(logging.DEBUG, logger="peftfx")
    with progress.timed(log, "a quick step"):
        pass
    levels = [(r.getMessage().split(":")[0], r.levelno) for r in caplog.records]
    assert levels == [("a quick step ...", logging.INFO), ("a quick step", logging.DEBUG)]


@pytest.fixture(scope="module")
def merging_pm():
    return _tiny_pm()


def _merge_bar(pm, capsys) -> str:
    """stderr of merging and unmerging `pm` (a bar for each, when bars show)."""
    capsys.readouterr()
    pm.merge_adapter()
    pm.unmerge_adapter()
    return capsys.readouterr().err


def test_merge_shows_a_bar_unless_bars_are_off(merging_pm, capsys, monkeypatch):
    if not progress.progress_bars_enabled():
        pytest.skip("progress bars are switched off in this environment (HF_HUB_DISABLE_PROGRESS_BARS?)")
    monkeypatch.setattr(progress, "BAR_DELAY_S", 0.0)  # show at once (a real merge shows it after 2 s)
    shown = _merge_bar(merging_pm, capsys)
    assert "Merging adapters into the model" in shown and "2/2" in shown and "Unmerging adapters" in shown

    progress.disable_progress_bars()
    try:
        assert "Merging" not in _merge_bar(merging_pm, capsys)
    finally:
        progress.enable_progress_bars()

    logger = logging.getLogger("peftfx")
    logger.setLevel(logging.ERROR)  # a quiet logger
    try:
        assert "Merging" not in _merge_bar(merging_pm, capsys)
    finally:
        logger.setLevel(logging.NOTSET)

    transformers.utils.logging.disable_progress_bar()  # transformers' switch counts too
    try:
        assert "Merging" not in _merge_bar(merging_pm, capsys)
    finally:
        transformers.utils.logging.enable_progress_bar()
    assert "Merging" in _merge_bar(merging_pm, capsys)  # and back on


def test_a_quick_merge_shows_no_bar(merging_pm, capsys):
    assert progress.BAR_DELAY_S >= 1.0  # a bar appears only for a merge still running after this long
    assert "Merging" not in _merge_bar(merging_pm, capsys)


# -- atomic writes ------------------------------------------------------------------------------------------


def test_atomic_write_is_whole_or_nothing(tmp_path):
    target = tmp_path / "file.txt"
    assert atomic_write(str(target), "old\n") == str(target)
    atomic_write(str(target), b"new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask()

    def broken(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(target), broken)
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["file.txt"]


# -- warnings -------------------------------------------------------------------------------------------------


def test_no_pytree_deprecation_warning_from_peftfx(tmp_path):
    """torch deprecates LeafSpec with a FutureWarning; apply, a run and export stay quiet."""
    import copy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = _tiny_pm()
        with torch.no_grad():
            pm(**_ids())
        peftfx.export(pm, str(tmp_path / "model.pt2"))
    noise = [str(w.message) for w in caught if issubclass(w.category, FutureWarning) and "LeafSpec" in str(w.message)]
    assert noise == []

    with warnings.catch_warnings(record=True) as caught:  # the check can fail: copying the graph warns
        warnings.simplefilter("always")
        copy.deepcopy(pm.graph_module.graph)
    assert any("LeafSpec" in str(w.message) for w in caught)
