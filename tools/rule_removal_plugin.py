"""A pytest plugin that removes one rule of one graph pass before any test runs (tools/rule_removal.py).

    PEFTFX_REMOVE_RULE=lora.linear python3 -m pytest -p peftfx.tools.rule_removal_plugin tests/passes -x

`pytest_configure` finds the pass in `peftfx.state.variants.PIPELINE` and replaces its `rules` tuple in
place (`object.__setattr__` on the frozen dataclass), so every holder of that Pass object (PIPELINE, the
pass module's `PASS`, a method's `passes`) runs without the rule. The tests of the pass itself
(tests/passes/test_<pass>.py) are moved to the front, so a `-x` run stops soon. With
PEFTFX_RULE_REPORT naming a file, the first failing test's id is written there.
Without PEFTFX_REMOVE_RULE the plugin does nothing.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest

REMOVE_ENV = "PEFTFX_REMOVE_RULE"  # "<pass>.<rule>"
REPORT_ENV = "PEFTFX_RULE_REPORT"  # a file that receives the first failing test's node id

_removed: Optional[tuple[str, str]] = None
_reported = False


def find_rule(qualified: str):
    """(the PIPELINE's Pass, the rule) named `<pass>.<rule>`; raises LookupError naming what exists."""
    from peftfx.state.variants import PIPELINE

    pass_name, _, rule_name = qualified.partition(".")
    known = [f"{p.name}.{r.name}" for p in PIPELINE for r in p.rules]
    for graph_pass in PIPELINE:
        if graph_pass.name == pass_name:
            for rule in graph_pass.rules:
                if rule.name == rule_name:
                    return graph_pass, rule
    raise LookupError(f"no rule {qualified!r} in peftfx.state.variants.PIPELINE; known: {', '.join(known)}")


def pytest_configure(config: pytest.Config) -> None:
    global _removed
    qualified = os.environ.get(REMOVE_ENV)
    if not qualified:
        return
    try:
        graph_pass, rule = find_rule(qualified)
    except LookupError as exc:
        raise pytest.UsageError(str(exc)) from None
    object.__setattr__(graph_pass, "rules", tuple(r for r in graph_pass.rules if r is not rule))
    _removed = (graph_pass.name, rule.name)


def pytest_report_header(config: pytest.Config) -> Optional[str]:
    if _removed is None:
        return None
    return f"peftfx rule removal: {'.'.join(_removed)} removed from the pipeline"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """The removed rule's own pass tests first (stable otherwise)."""
    if _removed is None:
        return
    own = f"test_{_removed[0]}.py"
    items.sort(key=lambda item: not (item.path.name == own and item.path.parent.name == "passes"))


def _report(nodeid: str) -> None:
    global _reported
    path = os.environ.get(REPORT_ENV)
    if _reported or not path:
        return
    _reported = True
    with open(path, "w", encoding="utf-8") as f:
        f.write(nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _report(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _report(f"{report.nodeid} (collection)")
