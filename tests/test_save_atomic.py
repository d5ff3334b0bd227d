"""Saves are all-or-nothing: an interrupt at any file operation of save_pretrained leaves the old save or
the new one, for peftfx and for PEFT; leftovers of killed saves, permissions, errors for damaged files."""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import threading
import time

import peft
import pytest
import torch
from peft.utils import load_peft_weights

import peftfx
import peftfx.io
import peftfx.save_store
from conftest import CONFIGS, batch
from peftfx.errors import CheckpointError, ConfigError

# Every file-system call a save makes that changes something, plus the weights writer.
OPS = ("replace", "rename", "symlink", "link", "unlink", "remove", "rmdir", "mkdir", "chmod")
USER_FILES = {"notes.txt": "mine", "other/README.md": "also mine"}


@contextlib.contextmanager
def interrupting(at: int | None = None, kill: bool = False):
    """Count file operations; raise KeyboardInterrupt at operation number `at` (Ctrl-C: clean-up handlers
    still run) or, with `kill`, at that one and every later one (kill -9: nothing runs after it)."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        def wrap(name, fn):
            def op(*args, **kwargs):
                n = len(calls)
                calls.append(name)
                if at is not None and (n == at or (kill and n > at)):
                    raise KeyboardInterrupt(f"simulated interrupt at {name} (operation {n})")
                return fn(*args, **kwargs)
            return op
        for name in OPS:
            mp.setattr(os, name, wrap(name, getattr(os, name)))
        mp.setattr(peftfx.io, "save_file", wrap("save_file", peftfx.io.save_file))
        yield calls


def _tiny_llama(model_dirs):
    cls = CONFIGS["llama"][0]
    return cls.from_pretrained(model_dirs["llama"]).eval()


def _randomize(pm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in pm.adapters.adapter_names():
            for _, p in pm.adapters.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def models(model_dirs):
    """An "old" and a "new" model whose adapters differ in every tensor and in their configs."""
    old = peftfx.apply(_tiny_llama(model_dirs), peftfx.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    old.add_adapter("other", peftfx.LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"]))
    _randomize(old, 1)
    new = peftfx.apply(_tiny_llama(model_dirs), peftfx.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    new.add_adapter("other", peftfx.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    new.add_adapter("third", peftfx.LoraConfig(r=2, target_modules=["k_proj"]))
    _randomize(new, 2)
    return old, new


NAMES = ("default", "other", "third")
SCENARIOS = {  # adapters of the old save, adapters of the new save
    "single": (["default"], ["default"]),
    "multi": (["default", "other"], ["default", "other", "third"]),
}


def _adapter_dir(folder, name):
    return str(folder) if name == "default" else os.path.join(folder, name)


def peftfx_view(folder) -> dict:
    """What peftfx's reader sees: name -> (config, tensors), None where the adapter cannot be found."""
    view = {}
    for name in NAMES:
        try:
            config_path, weights_path = peftfx.io.resolve_adapter_files(_adapter_dir(folder, name))
        except FileNotFoundError:
            view[name] = None
            continue
        view[name] = (peftfx.io.read_config(config_path).to_dict(), peftfx.io.read_weights(weights_path))
    return view


def _view_of_present(folder, read) -> dict:
    """name -> read(adapter folder) for each adapter whose config is there, None for the others."""
    view = {}
    for name in NAMES:
        path = _adapter_dir(folder, name)
        view[name] = read(path) if os.path.isfile(os.path.join(path, "adapter_config.json")) else None
    return view


def peft_view(folder) -> dict:
    """What HF PEFT reads from the folder, through its own loaders."""
    return _view_of_present(folder, lambda path: (peft.PeftConfig.from_pretrained(path).to_dict(),
                                                  load_peft_weights(path)))


def loaded_view(reader, folder) -> dict:
    """Load each adapter into a model with load_adapter (peftfx.load's path) and read back what it holds."""
    def load(path):
        reader.load_adapter(path, adapter_name="probe")
        held = reader.peft_config["probe"].to_dict(), reader.adapter_state_dict("probe")
        reader.delete_adapter("probe")
        return held
    return _view_of_present(folder, load)


def same(a, b) -> bool:
    """Equal views: configs equal and tensors equal bit for bit."""
    if a is None or b is None:
        return a is b
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _old_folder(models, tmp_path, names, layout: str):
    """An older save with user files in it: by peftfx, or as plain files (PEFT or an older peftfx)."""
    old, _ = models
    src = tmp_path / "old-src"
    old.save_pretrained(str(src), selected_adapters=names)
    folder = tmp_path / "old-template"
    if layout == "peftfx":
        shutil.copytree(src, folder, symlinks=True)
    else:
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns(peftfx.save_store.STORE))
        assert not any(p.is_symlink() for p in folder.rglob("*"))
    for rel, text in USER_FILES.items():
        (folder / rel).parent.mkdir(exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def _user_files_kept(folder) -> bool:
    return all((folder / rel).is_file() and (folder / rel).read_text() == text for rel, text in USER_FILES.items())


def _assert_no_leftovers(folder) -> None:
    store = folder / peftfx.save_store.STORE
    entries = sorted(os.listdir(store))
    assert len(entries) == 2 and "current" in entries, entries
    assert os.readlink(store / "current") in entries
    for sub in [folder] + [p for p in folder.iterdir() if p.is_dir() and p.name != peftfx.save_store.STORE]:
        for p in sub.iterdir():
            assert not p.name.startswith(peftfx.save_store.TMP_PREFIX), p
            assert not (p.is_symlink() and not p.exists()), f"dangling link {p}"


@pytest.mark.parametrize("scenario,layout", [
    ("multi", "peftfx"), ("single", "peftfx"), ("single", "plain"),
    pytest.param("multi", "plain", marks=pytest.mark.slow),  # the most interrupt points (about 15 s)
])
def test_an_interrupt_anywhere_leaves_the_old_save_or_the_new_one(models, tmp_path, monkeypatch, scenario, layout):
    """Old save by peftfx or as plain files (PEFT, older peftfx); interrupted at every file operation."""
    monkeypatch.setattr(peftfx.save_store, "fsync", lambda path: None)  # for power loss, which is not simulated here
    old_names, new_names = SCENARIOS[scenario]
    old, new = models
    template = _old_folder(models, tmp_path, old_names, layout)
    clean_new = tmp_path / "clean-new"
    new.save_pretrained(str(clean_new), selected_adapters=new_names)
    expected = {"old": (peftfx_view(template), peft_view(template)),
                "new": (peftfx_view(clean_new), peft_view(clean_new))}
    assert not same(expected["old"][0]["default"], expected["new"][0]["default"])  # the test can tell them apart

    counting = tmp_path / "count"
    shutil.copytree(template, counting, symlinks=True)
    with interrupting() as calls:
        new.save_pretrained(str(counting), selected_adapters=new_names)
    assert {"replace", "save_file"} <= set(calls) and len(calls) > 10
    seen = set()
    for kill in (False, True):
        for at in range(len(calls)):
            folder = tmp_path / f"run-{int(kill)}-{at}"
            shutil.copytree(template, folder, symlinks=True)
            with pytest.raises(KeyboardInterrupt), interrupting(at, kill):
                new.save_pretrained(str(folder), selected_adapters=new_names)
            ours, theirs = peftfx_view(folder), peft_view(folder)
            state = next((s for s, (e_ours, e_theirs) in expected.items()
                          if same(ours, e_ours) and same(theirs, e_theirs)), None)
            assert state is not None, f"a mix after an interrupt at {calls[at]} (operation {at}, kill={kill})"
            if kill:  # a real load too (resolve, read, add_adapter) where a killed save left most leftovers
                assert same(loaded_view(old, folder), expected[state][0]), f"load differs (operation {at})"
            assert _user_files_kept(folder)
            seen.add(state)
            # Leftovers of the interrupted save disturb neither the next save nor the next load.
            new.save_pretrained(str(folder), selected_adapters=new_names)
            assert same(peftfx_view(folder), expected["new"][0]) and same(peft_view(folder), expected["new"][1])
            assert _user_files_kept(folder)
            _assert_no_leftovers(folder)
            shutil.rmtree(folder)
    assert seen == {"old", "new"}  # interrupts both before and after the commit were exercised


def test_a_saved_folder_runs_the_same_in_peftfx_and_peft(models, model_dirs, tmp_path):
    _, new = models
    new.save_pretrained(str(tmp_path), selected_adapters=["default", "other"])
    kw = batch()
    ref = peft.PeftModel.from_pretrained(_tiny_llama(model_dirs), str(tmp_path)).eval()
    new.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(ref(**kw).logits, new.eval()(**kw).logits, atol=1e-5, rtol=1e-5)
    loaded = peftfx.load(_tiny_llama(model_dirs), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    assert same(loaded.adapter_state_dict("other"), new.adapter_state_dict("other"))


def test_reads_racing_saves_get_a_matching_pair(models, tmp_path, monkeypatch):
    """peftfx resolves the config's link once and takes the weights from the same save folder."""
    old, new = models
    read_weights = peftfx.io.read_weights

    def slow_read_weights(path):  # widen the gap between reading the config and the weights
        time.sleep(0.003)
        return read_weights(path)

    pair = {}
    for name, pm in (("old", old), ("new", new)):
        pm.save_pretrained(str(tmp_path / name), selected_adapters=["default"])
        config, weights, _ = peftfx.io.read_adapter(str(tmp_path / name))
        pair[name] = (config.to_dict(), weights)
    folder = tmp_path / "live"
    old.save_pretrained(str(folder), selected_adapters=["default"])
    stop = threading.Event()

    def keep_saving():
        while not stop.is_set():
            for pm in (new, old):
                pm.save_pretrained(str(folder), selected_adapters=["default"])

    monkeypatch.setattr(peftfx.io, "read_weights", slow_read_weights)
    saver = threading.Thread(target=keep_saving)
    saver.start()
    try:
        states = set()
        for _ in range(150):
            config, weights, _ = peftfx.io.read_adapter(str(folder))
            view = (config.to_dict(), weights)
            state = next((s for s, expected in pair.items() if same(view, expected)), None)
            assert state is not None, "a load racing a save got a mixed pair"
            states.add(state)
    finally:
        stop.set()
        saver.join()
    assert states == {"old", "new"}


def test_saving_some_adapters_keeps_the_others_and_drops_leftovers(models, tmp_path):
    old, new = models
    folder = tmp_path / "f"
    old.save_pretrained(str(folder), selected_adapters=["default", "other"])
    before = peftfx_view(folder)
    # Killed at its commit, a save leaves its staged folder and links to the never-committed "third".
    shutil.copytree(folder, tmp_path / "count", symlinks=True)
    with interrupting() as calls:
        new.save_pretrained(str(tmp_path / "count"), selected_adapters=["default", "third"])
    commit = max(i for i, name in enumerate(calls) if name == "replace")
    with pytest.raises(KeyboardInterrupt), interrupting(commit, kill=True):
        new.save_pretrained(str(folder), selected_adapters=["default", "third"])
    assert same(peftfx_view(folder), before) and same(peft_view(folder)["third"], None)
    assert os.path.islink(folder / "third" / "adapter_config.json")  # dangling: absent to every reader
    assert len(os.listdir(folder / peftfx.save_store.STORE)) == 4  # current, live save, staged save, new link

    new.save_pretrained(str(folder), selected_adapters=["default"])
    after = peftfx_view(folder)
    assert same(after["default"], peftfx_view(tmp_path / "count")["default"])
    assert same(after["other"], before["other"]) and after["third"] is None  # "other" kept, as PEFT does
    assert not (folder / "third").exists()
    _assert_no_leftovers(folder)


def test_saved_files_get_umask_permissions(models, tmp_path):
    _, new = models
    for umask in (0o022, 0o002, 0o077):
        previous = os.umask(umask)
        try:
            folder = tmp_path / f"umask-{umask:o}"
            new.save_pretrained(str(folder), selected_adapters=["default", "other"])
            new.save_pretrained(str(folder), selected_adapters=["default", "other"])  # over a save too
        finally:
            os.umask(previous)
        for path in [folder, *folder.rglob("*")]:
            if path.is_symlink():
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


def test_plain_filesystem_fallback_saves_whole_files(models, tmp_path, monkeypatch):
    _, new = models

    def no_links(*args, **kwargs):
        raise OSError(1, "symbolic links are not supported here")

    monkeypatch.setattr(os, "symlink", no_links)
    with pytest.warns(UserWarning, match="without symbolic links"):
        new.save_pretrained(str(tmp_path), selected_adapters=["default", "other"])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    assert stat.S_IMODE(os.stat(tmp_path / "adapter_model.safetensors").st_mode) == 0o666 & ~_umask()
    assert same(peftfx_view(tmp_path)["other"][1], new.adapter_state_dict("other"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- errors ------------------------------------------------------------------------------------------

def test_nothing_to_save_is_an_error_that_writes_nothing(models, model_dirs, tmp_path):
    _, new = models
    with pytest.raises(CheckpointError, match="no adapter to save.*selected_adapters"):
        new.save_pretrained(str(tmp_path / "a"), selected_adapters=[])
    assert not (tmp_path / "a").exists()
    pm = peftfx.apply(_tiny_llama(model_dirs), peftfx.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.delete_adapter("default")
    with pytest.raises(CheckpointError, match="no adapter to save"):
        pm.save_pretrained(str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


@pytest.fixture
def saved(models, tmp_path):
    """A plain-file adapter folder and a model to load into, with its state before any load."""
    old, _ = models
    old.save_pretrained(str(tmp_path / "src"), selected_adapters=["default"])
    folder = tmp_path / "plain"
    shutil.copytree(tmp_path / "src", folder, ignore=shutil.ignore_patterns(peftfx.save_store.STORE))
    kw = batch()
    with torch.no_grad():
        logits = old.eval()(**kw).logits
    return folder, old, (sorted(old.peft_config), old.active_adapters, logits, kw)


def _unchanged(pm, before) -> None:
    names, active, logits, kw = before
    assert sorted(pm.peft_config) == names and pm.active_adapters == active
    with torch.no_grad():
        assert torch.equal(pm(**kw).logits, logits)


@pytest.mark.parametrize("content", [b"", b"   \n", b'{"r": 4, "lora_alpha":', b"\xff\xfe garbage", b"[1, 2]"])
def test_damaged_config_is_a_config_error_naming_the_file(saved, content):
    folder, pm, before = saved
    (folder / "adapter_config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=r"adapter_config\.json.*(empty|not valid JSON|not an object)") as info:
        pm.load_adapter(str(folder), adapter_name="bad")
    assert str(folder) in str(info.value)
    _unchanged(pm, before)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_safetensors_is_a_checkpoint_error_naming_the_file(saved, damage):
    folder, pm, before = saved
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: cannot read.*truncated or damaged"):
        pm.load_adapter(str(folder), adapter_name="bad")
    _unchanged(pm, before)


def test_damaged_bin_is_a_checkpoint_error_naming_the_file(saved):
    folder, pm, before = saved
    weights = load_peft_weights(str(folder))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(weights, folder / "adapter_model.bin")
    data = (folder / "adapter_model.bin").read_bytes()
    (folder / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin: cannot read.*truncated or damaged") as info:
        pm.load_adapter(str(folder), adapter_name="bad")
    assert str(folder) in str(info.value)
    _unchanged(pm, before)


def test_damaged_file_in_a_peftfx_save_names_it(models, tmp_path):
    old, _ = models
    old.save_pretrained(str(tmp_path), selected_adapters=["default"])
    with open(tmp_path / "adapter_config.json", "w") as f:  # writes through the link, into the live save
        f.write("{")
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        old.load_adapter(str(tmp_path), "bad")
    assert str(tmp_path) in str(info.value)
    assert sorted(old.peft_config) == ["default", "other"]
