"""Imports point one way: passes -> rewrite layer; engine -> passes; model -> engine; tools -> model.

Read from the source with `ast` (module-level imports only: a function may import lazily upward, as
`peftfx.visualize` imports the visualizer on first use). This is what keeps the layering true as code
is added; docs/concepts.md draws the same graph.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"peftfx": ROOT / "peftfx", "peftfx.passes": ROOT / "passes", "peftfx.tools": ROOT / "tools"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if package == "peftfx" and path.is_relative_to(ROOT / "peftfx" / "passes"):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _top_level_imports(name: str, path: pathlib.Path) -> set[str]:
    """peftfx modules imported at module level (relative imports resolved; TYPE_CHECKING blocks skipped)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("peftfx"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.startswith("peftfx"):
                    submodules = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES}
                    out.update(submodules or {module})  # `from .. import select` imports peftfx.select only

    visit(tree.body)
    return out


def _layer(module: str) -> str:
    if module.startswith("peftfx.tools"):
        return "tools"
    if module.startswith("peftfx.passes"):
        return "passes"
    if module.startswith("peftfx.rewrite"):
        return "rewrite"
    if module == "peftfx.errors":
        return "errors"
    if module in ("peftfx", "peftfx.model", "peftfx.api"):
        return "model"
    return "engine"


# layer -> the layers it may import at module level
ALLOWED = {
    "errors": set(),
    "rewrite": {"errors"},
    "passes": {"rewrite", "errors"},
    "engine": {"engine", "passes", "rewrite", "errors"},
    "model": {"model", "engine", "rewrite", "errors"},
    "tools": {"tools", "model", "engine", "passes", "rewrite", "errors"},
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    layer = _layer(module)
    wrong = sorted(m for m in _top_level_imports(module, MODULES[module])
                   if _layer(m) != layer and _layer(m) not in ALLOWED[layer])
    assert not wrong, f"{module} ({layer}) imports {wrong}; {layer} may import only {sorted(ALLOWED[layer])}"


def test_no_import_path_tricks():
    """The package-dir mapping alone makes passes/ and tools/ importable: no __path__ or sys.path edits."""
    for module, path in MODULES.items():
        source = path.read_text()
        assert "__path__.append" not in source and "sys.path.insert" not in source \
            and "sys.path.append" not in source, module


def test_every_package_folder_is_installed():
    """A non-editable install ships only the packages pyproject.toml lists: a new subpackage must be there."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert folders == listed, f"missing from pyproject.toml: {sorted(folders - listed)}; extra: {sorted(listed - folders)}"
