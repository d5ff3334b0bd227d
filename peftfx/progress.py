"""Progress of the steps that can take seconds (capture, merge, export, AOTInductor): log records and bars.

Messages go to the standard `logging` module, on loggers under "peftfx" (peftfx.capture, peftfx.merge,
peftfx.export, ...). As a library, peftfx adds no handler: with logging unconfigured its INFO records are
not shown; `logging.basicConfig(level=logging.INFO)` (or a handler on the "peftfx" logger) shows them,
and the `peftfx` command line shows them on stderr.

Bars are tqdm bars that appear only once a loop has run for `BAR_DELAY_S` seconds, so a small model never
shows one. They are off when the "peftfx" logger is quiet (its level set above WARNING, e.g.
`logging.getLogger("peftfx").setLevel(logging.ERROR)`), after `disable_progress_bars()`, and when
transformers' bars are off (`transformers.utils.logging.disable_progress_bar()`, or
HF_HUB_DISABLE_PROGRESS_BARS=1), following the same switches transformers and huggingface_hub use.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

ROOT = "peftfx"
SLOW_S = 2.0  # a step that took longer than this logs its duration at INFO (else DEBUG)
BAR_DELAY_S = 2.0  # a bar shows only after its loop has run this long (tqdm's `delay`)

T = TypeVar("T")
_bars_on = True  # peftfx's own switch (disable_progress_bars / enable_progress_bars)


def get_logger(name: str) -> logging.Logger:
    """The logger `peftfx.<name>` (a child of "peftfx", so one level or handler there governs all)."""
    return logging.getLogger(f"{ROOT}.{name}")


@contextlib.contextmanager
def timed(logger: logging.Logger, message: str) -> Iterator[None]:
    """Log "`message` ..." at INFO before a step and, when it took over SLOW_S seconds, how long at INFO
    (DEBUG otherwise): a step that may take a while says what it is doing before the wait."""
    logger.info("%s ...", message, stacklevel=3)  # records name the caller's line, not this module's
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    level = logging.INFO if elapsed > SLOW_S else logging.DEBUG
    logger.log(level, "%s: done in %.1f s", message, elapsed, stacklevel=3)


def disable_progress_bars() -> None:
    """Turn peftfx's progress bars off (log records are governed by the loggers' levels)."""
    global _bars_on
    _bars_on = False


def enable_progress_bars() -> None:
    """Turn peftfx's progress bars back on (they still follow the logger level and transformers' switch)."""
    global _bars_on
    _bars_on = True


def progress_bars_enabled(logger: Optional[logging.Logger] = None) -> bool:
    """Whether a bar may show: peftfx's switch is on, `logger` (default "peftfx") is not quiet (it still
    shows WARNING), and neither transformers' nor huggingface_hub's progress bars are disabled."""
    if not _bars_on or not (logger or logging.getLogger(ROOT)).isEnabledFor(logging.WARNING):
        return False
    transformers_logging = sys.modules.get("transformers.utils.logging")  # only if transformers is loaded
    if transformers_logging is not None and not transformers_logging.is_progress_bar_enabled():
        return False
    from huggingface_hub.utils import are_progress_bars_disabled  # HF_HUB_DISABLE_PROGRESS_BARS

    return not are_progress_bars_disabled()


def bar(
    iterable: Iterable[T], *, desc: str, total: Optional[int] = None, logger: Optional[logging.Logger] = None
) -> Iterable[T]:
    """`iterable` wrapped in a tqdm bar that appears after BAR_DELAY_S seconds, or as is when bars are off
    (see progress_bars_enabled; `logger` is the step's own logger, whose level counts)."""
    if not progress_bars_enabled(logger):
        return iterable
    from tqdm.auto import tqdm  # type: ignore[import-untyped]  # comes with transformers and huggingface_hub

    return tqdm(iterable, desc=desc, total=total, delay=BAR_DELAY_S)


@contextlib.contextmanager
def log_to_stderr(level: int = logging.INFO) -> Iterator[None]:
    """Show peftfx's records of `level` and above on stderr while the block runs (the command line's
    progress output); the logger's level and handlers are restored after."""
    logger = logging.getLogger(ROOT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


__all__ = [
    "get_logger",
    "timed",
    "bar",
    "disable_progress_bars",
    "enable_progress_bars",
    "progress_bars_enabled",
    "log_to_stderr",
]
