"""All-or-nothing saves of a folder: what `save_pretrained` writes, a reader sees whole or not at all.

Saves are all-or-nothing. A save changes several files (config and weights of each adapter), and no
sequence of file renames does that atomically, while renaming the folder itself would move the user's
own files in it (and leave no folder at all for a moment). So the files live in save folders inside a
hidden `.peftfx/` store, and one symbolic link names the live one:

    <folder>/adapter_config.json        -> .peftfx/current/adapter_config.json
    <folder>/adapter_model.safetensors  -> .peftfx/current/adapter_model.safetensors
    <folder>/<name>/adapter_config.json -> ../.peftfx/current/<name>/adapter_config.json  (and weights)
    <folder>/.peftfx/current            -> save-<id>
    <folder>/.peftfx/save-<id>/         the files of the live save

A save writes and fsyncs a complete new `save-<id>` (adapters of the live save that this save does not
name are hard-linked in, so they stay, as with PEFT); makes every entry path such a link (a plain file
from PEFT or an older peftfx is first hard-linked into the live save, then replaced by the link: one
rename, same bytes; a new entry's link dangles, i.e. is absent, as it is in the live save); and then
commits with a single `rename(2)` of a fresh link over `.peftfx/current`. Each step before the commit
leaves what readers see unchanged; the commit switches every adapter at once. After it the old save,
temporary links and dangling links are removed; leftovers of a killed save are removed by the next save.
An exclusive lock on the store makes concurrent saves to one folder take turns. The user's files are
not touched.

Guarantees and limits:
- after a save that returns, fails or is interrupted anywhere (Ctrl-C, kill, crash, and power loss on a
  filesystem that honours fsync), peftfx, PEFT and any tool that follows links read all of the old
  save or all of the new one;
- peftfx's reader takes a shared lock on the store (saves take it exclusively) and reads the weights
  from the save folder the config resolved to, so a load racing a save waits for it and gets a matching
  pair; a reader that opens the two files by path at different times (PEFT) can get a mix only if a
  save commits between its two opens;
- tools that copy by content (`shutil.copytree`, `zip`, `huggingface_hub.upload_folder`) copy `.peftfx/`
  as well; exclude it (`ignore_patterns=".peftfx/*"`) or copy links as links (`cp -r`, `tar`, `rsync -a`);
- on a filesystem without symbolic links (Windows without developer mode, FAT) peftfx warns and replaces
  the files one by one, as PEFT does: each file is whole, but an interrupt can leave them mixed.
Saved files get the usual permissions (0o666 & ~umask; folders 0o777 & ~umask).

One file on its own (an adapter's files inside a save folder, an exported .pt2, a drawing, the demo's
graph.py) is written with `atomic_write`: a temporary file beside it, flushed, then renamed over it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import warnings
from typing import Any, Callable, Iterator, Optional, Union

from .errors import CheckpointError

STORE = ".peftfx"  # hidden folder inside the save folder that holds the saves
CURRENT = "current"  # link in STORE naming the live save; the one rename that commits a save
SAVE_PREFIX = "save-"
TMP_PREFIX = ".peftfx-tmp-"  # temporary links beside entry files (removed by the next save if killed)

Writer = Callable[[str], None]  # writes one part's files into the (existing) folder it is given


def save(directory: str, parts: dict[str, Writer], entry_files: tuple[str, ...]) -> None:
    """Write `parts` (sub-folder -> writer; "" is the folder itself) into `directory`, all-or-nothing.
    `entry_files` are the file names a part writes (the entries readers open)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"save_pretrained: {directory!r} exists and is a file; give a folder path.")
    made_folder = not os.path.isdir(directory)
    os.makedirs(directory, exist_ok=True)
    store = os.path.join(directory, STORE)
    made_store = not os.path.isdir(store)
    try:
        os.makedirs(store, exist_ok=True)
        with locked(store):
            if _links_work(store):
                _save_linked(directory, store, parts, entry_files)
            else:
                warnings.warn(
                    f"{directory!r} is on a filesystem without symbolic links: saving file by file, "
                    "so an interrupted save can leave old and new files mixed.",
                    stacklevel=4,
                )
                _save_plain(directory, parts)
        if made_store and not os.path.lexists(os.path.join(store, CURRENT)):
            shutil.rmtree(store, ignore_errors=True)
    except BaseException:
        if made_store and not os.path.lexists(os.path.join(store, CURRENT)):
            shutil.rmtree(store, ignore_errors=True)
        if made_folder:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only if empty: what we made, nothing else
        raise


def _save_linked(directory: str, store: str, parts: dict[str, Writer], entry_files: tuple[str, ...]) -> None:
    """Stage a complete save folder in the store, link the entry paths, commit with one rename."""
    old = _live_save(store)
    _remove_stale(store, keep=old)
    new = _fresh_name(store, SAVE_PREFIX)
    staged = os.path.join(store, new)
    os.mkdir(staged)
    try:
        subs = set(parts)
        for sub, write in parts.items():
            folder = os.path.join(staged, sub)
            os.makedirs(folder, exist_ok=True)
            write(folder)
        carried = [
            rel
            for rel in (_files_under(os.path.join(store, old)) if old else [])
            if os.path.dirname(rel) not in subs and _is_our_link(directory, rel)
        ]
        for rel in _files_under(staged):
            old = _link_entry(directory, store, rel, old)
        for rel in carried:  # adapters of the live save this save does not name stay as they are
            assert old is not None  # carried is empty unless a save was live (and _link_entry keeps it)
            dest = os.path.join(staged, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            _link_or_copy(os.path.join(store, old, rel), dest)
        for root, _, _ in os.walk(staged):  # files, folders and links reach the disk before the commit
            fsync(root)
        for sub in {os.path.dirname(rel) for rel in _files_under(staged)} | {""}:
            fsync(os.path.join(directory, sub))
        _point(store, new)  # the commit
    except BaseException:
        if _live_save(store) != new:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    _remove_stale(store, keep=new)
    _prune_entries(directory, entry_files)


def _save_plain(directory: str, parts: dict[str, Writer]) -> None:
    """Without symbolic links: each part written into a temporary folder beside its files, then each file
    renamed into place, one after another (PEFT's behaviour: every file whole, but files may mix)."""
    for sub, write in parts.items():
        folder = os.path.join(directory, sub) if sub else directory
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=folder, prefix=".tmp-")
        try:
            write(tmp)
            for name in sorted(os.listdir(tmp)):
                os.replace(os.path.join(tmp, name), os.path.join(folder, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _link_entry(directory: str, store: str, rel: str, live: Optional[str]) -> Optional[str]:
    """Make `<directory>/<rel>` a link through `.peftfx/current`, without changing what it shows now.

    Returns the live save's name (made here when a plain file is converted and no save is live yet)."""
    path = os.path.join(directory, rel)
    target = _link_target(rel)
    if os.path.islink(path) and os.readlink(path) == target:
        return live
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.lexists(path):
        os.symlink(target, path)  # dangles until the commit: absent, as in the live save
        return live
    if os.path.isdir(path):
        raise CheckpointError(f"cannot save: {path!r} is a folder where the adapter file goes; move it away.")
    # A plain file (from PEFT or an older save): put its bytes into the live save, then swap in the link.
    if live is None:
        live = _fresh_name(store, SAVE_PREFIX)
        os.mkdir(os.path.join(store, live))
        _point(store, live)
    held = os.path.join(store, live, rel)
    os.makedirs(os.path.dirname(held), exist_ok=True)
    tmp = os.path.join(os.path.dirname(held), _fresh_name(os.path.dirname(held), TMP_PREFIX))
    _link_or_copy(path, tmp)
    os.replace(tmp, held)
    fsync(os.path.dirname(held))
    tmp = os.path.join(os.path.dirname(path), _fresh_name(os.path.dirname(path), TMP_PREFIX))
    os.symlink(target, tmp)
    os.replace(tmp, path)
    return live


def _link_target(rel: str) -> str:
    """Relative link text for entry `rel` (kept relative so the folder can be moved or copied with links)."""
    depth = rel.count("/")
    return "../" * depth + f"{STORE}/{CURRENT}/{rel}"


def _is_our_link(directory: str, rel: str) -> bool:
    path = os.path.join(directory, rel)
    return os.path.islink(path) and os.readlink(path) == _link_target(rel)


def _point(store: str, save: str) -> None:
    """Atomically make `.peftfx/current` name `save` (a new link renamed over the old one)."""
    tmp = os.path.join(store, _fresh_name(store, "current-"))
    os.symlink(save, tmp, target_is_directory=True)
    os.replace(tmp, os.path.join(store, CURRENT))
    fsync(store)


def _live_save(store: str) -> Optional[str]:
    """The name of the save `.peftfx/current` points at, if it exists."""
    link = os.path.join(store, CURRENT)
    if not os.path.islink(link):
        return None
    name = os.readlink(link)
    return name if os.sep not in name and os.path.isdir(os.path.join(store, name)) else None


def _remove_stale(store: str, keep: Optional[str]) -> None:
    """Remove everything in the store but the live save: old saves, leftovers of killed saves."""
    for entry in os.listdir(store):
        if entry in (CURRENT, keep):
            continue
        path = os.path.join(store, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _prune_entries(directory: str, entry_files: tuple[str, ...]) -> None:
    """Drop dangling entry links and temporary links in the folder and its adapter subfolders."""
    folders = [""] + sorted(
        e.name for e in os.scandir(directory) if e.name != STORE and e.is_dir(follow_symlinks=False)
    )
    for sub in folders:
        folder = os.path.join(directory, sub)
        removed = False
        for entry in os.listdir(folder):
            rel = os.path.join(sub, entry) if sub else entry
            path = os.path.join(folder, entry)
            stale_tmp = entry.startswith(TMP_PREFIX) and os.path.islink(path)
            if stale_tmp or (entry in entry_files and _is_our_link(directory, rel) and not os.path.exists(path)):
                os.unlink(path)
                removed = True
        if sub and removed and not os.listdir(folder):
            os.rmdir(folder)


def _files_under(folder: str) -> list[str]:
    """Relative paths ('/'-separated) of the files below `folder`."""
    out = []
    for root, _, files in os.walk(folder):
        rel_root = os.path.relpath(root, folder)
        for name in files:
            out.append(name if rel_root == "." else f"{rel_root.replace(os.sep, '/')}/{name}")
    return sorted(out)


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(os.path.realpath(src), dest)
    except OSError:  # no hard links here (or across devices for a foreign link): copy the bytes
        shutil.copy2(src, dest)


def _fresh_name(folder: str, prefix: str) -> str:
    while True:
        name = f"{prefix}{secrets.token_hex(6)}"
        if not os.path.lexists(os.path.join(folder, name)):
            return name


def _links_work(store: str) -> bool:
    if os.path.islink(os.path.join(store, CURRENT)):
        return True
    probe = os.path.join(store, _fresh_name(store, "probe-"))
    try:
        os.symlink(CURRENT, probe)
    except (OSError, NotImplementedError):
        return False
    os.unlink(probe)
    return True


@contextlib.contextmanager
def locked(store: str, shared: bool = False) -> Iterator[None]:
    """A lock on the store folder: saves take it exclusively (so they take turns), loads shared (so no
    save commits or removes a save folder while they read). Where locks are unavailable, none is taken."""
    try:
        import fcntl

        fd = os.open(store, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def fsync(path: str) -> None:
    """Flush a file or folder to disk, so a power loss cannot reorder the commit before the data."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it where the OS allows (setting it races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, content: Union[bytes, str, Callable[[str], Any]], *, sync: bool = True) -> str:
    """Write one file whole or not at all; every single-file write of peftfx goes through here.

    The file is written under a temporary name in the same folder, given the usual permissions
    (0o666 & ~umask), flushed to disk (`sync`), and renamed over `path`: a reader sees the old file or
    the new one, never half of one, and an error or interrupt leaves no temporary file behind.
    `content` is bytes, text (written as UTF-8), or a writer called with the temporary path
    (`torch.export.save`, safetensors' `save_file`, ...). The folder must exist. Returns `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        if os.path.isfile(tmp):  # after writing: writers such as safetensors recreate the file as 0600
            os.chmod(tmp, 0o666 & ~umask())
            if sync:
                fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.remove(tmp)
        raise
    if sync:
        fsync(folder)  # the rename itself reaches the disk
    return path


def local_pair(local: str, config_path: str, weights_names: tuple[str, ...]) -> Optional[tuple[str, str]]:
    """Config and weights of one save (the first of `weights_names` present; None if none is): when both
    are links into peftfx's store, the weights are taken from the save folder the config resolved to, so
    a save committing meanwhile cannot mix them."""
    real_config = os.path.realpath(config_path)
    in_store = f"{os.sep}{STORE}{os.sep}"
    for weights_name in weights_names:
        path = os.path.join(local, weights_name)
        if not os.path.isfile(path):
            continue
        if in_store in real_config and in_store in os.path.realpath(path):
            same_save = os.path.join(os.path.dirname(real_config), weights_name)
            if os.path.isfile(same_save):
                return real_config, same_save
        return config_path, path
    return None


def store_of(path: str) -> Optional[str]:
    """The `.peftfx` store a linked entry file resolves into, if any."""
    real = os.path.realpath(path)
    marker = f"{os.sep}{STORE}{os.sep}"
    at = real.rfind(marker)
    return real[: at + len(marker) - 1] if at >= 0 else None
