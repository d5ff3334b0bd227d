"""Rule removal: for every rule of every pass in the pipeline, do the tests notice when it is gone?

    python3 -m peftfx.tools.rule_removal [--only PASS.RULE ...] [--fast-only] [--markdown FILE]

For each pass in `peftfx.state.variants.PIPELINE` (passes added later are included without editing this
file) and each of its rules, pytest runs in a subprocess with that rule removed by
tools/rule_removal_plugin.py: first tests/passes with `-x` (the pass's own file first), then, only if
those all passed, the rest of the fast suite (`-m "not slow" -x`; skipped with --fast-only). A rule is
caught when some test failed. Before that, tests/passes runs once with nothing removed: a failing
baseline would make every rule look caught, so the tool stops there.

Prints a table (pass, rule, caught, the first failing test, seconds) and the same table in markdown.
Exit status: 0 when every rule was caught, 1 when some rule was not, 2 when a run could not be judged
(the baseline failed, pytest errored or timed out).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .rule_removal_plugin import REMOVE_ENV, REPORT_ENV, find_rule

PLUGIN = "peftfx.tools.rule_removal_plugin"
PASS_TESTS = "tests/passes"
TIMEOUT_S = 1800  # one pytest run; the whole fast suite takes ~11 minutes on 2 cores


@dataclass
class Outcome:
    pass_name: str
    rule: str
    caught: Optional[bool]  # None: the run could not be judged (pytest error, timeout)
    first_failure: str
    seconds: float
    phase: str  # where it was caught: "passes", "suite", or "" (not caught)

    @property
    def verdict(self) -> str:
        return {True: "yes", False: "no", None: "error"}[self.caught]


def repo_root() -> Path:
    """The checkout holding tests/ (peftfx is installed editable from it)."""
    import peftfx

    root = Path(peftfx.__file__).resolve().parent.parent
    if not (root / PASS_TESTS).is_dir():
        raise SystemExit(f"rule_removal: no {PASS_TESTS}/ next to {root / 'peftfx'}; run it from a peftfx checkout.")
    return root


def all_rules() -> list[tuple[str, str]]:
    from peftfx.state.variants import PIPELINE

    return [(p.name, r.name) for p in PIPELINE for r in p.rules]


def run_pytest(root: Path, args: Sequence[str], removed: Optional[str]) -> tuple[int, str, str]:
    """(exit status, first failing test id or "", last lines of the output) of one pytest run."""
    with tempfile.TemporaryDirectory(prefix="peftfx-rule-removal-") as scratch:
        report = os.path.join(scratch, "first_failure")
        env = dict(os.environ, **{REPORT_ENV: report})
        env.pop(REMOVE_ENV, None)
        if removed is not None:
            env[REMOVE_ENV] = removed
        command = [sys.executable, "-m", "pytest", "-q", "-p", PLUGIN, "-p", "no:cacheprovider", "-n", "0", *args]
        try:
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return -1, "", f"timed out after {TIMEOUT_S} s"
        first = Path(report).read_text(encoding="utf-8") if os.path.exists(report) else ""
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        return done.returncode, first, tail


def _judge(status: int, first: str) -> Optional[bool]:
    """pytest's exit status: 0 all passed, 1 tests failed, 2 interrupted (a collection error under -x)."""
    if status == 0:
        return False
    if status == 1 or (status == 2 and first):
        return True
    return None


def check_rule(root: Path, pass_name: str, rule: str, fast_only: bool, echo) -> Outcome:
    qualified = f"{pass_name}.{rule}"
    start = time.perf_counter()
    phases = [("passes", [PASS_TESTS, "-x"])]
    if not fast_only:
        phases.append(("suite", ["tests", f"--ignore={PASS_TESTS}", "-m", "not slow", "-x"]))
    caught: Optional[bool] = False
    first, where = "", ""
    for phase, args in phases:
        status, first, tail = run_pytest(root, args, qualified)
        caught = _judge(status, first)
        if caught is None:
            echo(f"  {qualified}: pytest exited with status {status} in phase {phase}:\n{tail}")
        if caught is not False:
            where = phase if caught else ""
            break
    return Outcome(pass_name, rule, caught, first, time.perf_counter() - start, where)


def table(outcomes: Sequence[Outcome]) -> str:
    rows = [("pass", "rule", "caught", "first failing test", "seconds")]
    rows += [(o.pass_name, o.rule, o.verdict, o.first_failure or "-", f"{o.seconds:.1f}") for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown(outcomes: Sequence[Outcome]) -> str:
    lines = ["| pass | rule | caught | first failing test | seconds |", "|---|---|---|---|---:|"]
    for o in outcomes:
        test = f"`{o.first_failure}`" if o.first_failure else "-"
        lines.append(f"| {o.pass_name} | {o.rule} | {o.verdict} | {test} | {o.seconds:.1f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m peftfx.tools.rule_removal", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PASS.RULE",
        help="check only this rule (repeat, or separate with commas)",
    )
    parser.add_argument("--fast-only", action="store_true", help="run tests/passes only, not the rest of the suite")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of tests/passes with nothing removed")
    parser.add_argument("--markdown", metavar="FILE", help="also write the markdown table to FILE")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    root = repo_root()

    def echo(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    wanted = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    if wanted:
        rules = []
        for qualified in wanted:
            try:
                graph_pass, rule = find_rule(qualified)
            except LookupError as exc:
                echo(f"rule_removal: {exc}")
                return 2
            rules.append((graph_pass.name, rule.name))
    else:
        rules = all_rules()

    if not args.no_baseline:
        start = time.perf_counter()
        status, first, tail = run_pytest(root, [PASS_TESTS], None)
        if status != 0:
            echo(
                f"rule_removal: {PASS_TESTS} fails with every rule in place (first: {first or '?'}); fix that "
                f"first, every rule would look caught.\n{tail}"
            )
            return 2
        echo(f"baseline: {PASS_TESTS} passes with every rule in place ({time.perf_counter() - start:.1f} s)")

    outcomes = []
    for pass_name, rule in rules:
        outcome = check_rule(root, pass_name, rule, args.fast_only, echo)
        echo(f"{pass_name}.{rule}: caught={outcome.verdict} {outcome.first_failure} ({outcome.seconds:.1f} s)")
        outcomes.append(outcome)

    scope = f"{PASS_TESTS} only" if args.fast_only else f"{PASS_TESTS}, then the fast suite"
    print(f"\nRule removal over peftfx.state.variants.PIPELINE ({scope}):\n")
    print(table(outcomes))
    md = markdown(outcomes)
    print("\nMarkdown:\n")
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n", encoding="utf-8")
    missed = [f"{o.pass_name}.{o.rule}" for o in outcomes if o.caught is False]
    errors = [f"{o.pass_name}.{o.rule}" for o in outcomes if o.caught is None]
    if missed:
        print(f"\nnot caught: {', '.join(missed)}")
    if errors:
        print(f"\ncould not judge: {', '.join(errors)}")
    return 2 if errors else 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
