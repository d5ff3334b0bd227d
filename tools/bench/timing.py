"""Timing helpers. Each figure is a median over rounds that time every side back to back (interleaved),
so bursts of foreign load on a shared machine hit all sides of a round alike.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm up each function, then time them round-robin (A, B, C, A, B, C, ...); seconds per call.
    The round's starting side rotates, so no side always runs right after the same other one."""
    names = list(fns)
    gc.collect()
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(timed(fns[name]))
    return samples


def looped(fn: Callable[[], Any], n: int) -> Callable[[], Any]:
    """n calls per timed sample, for operations of a few milliseconds or less (divide the samples by n)."""

    def run():
        for _ in range(n):
            fn()

    return run


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def round_ratio(num: list[float], den: list[float]) -> float:
    """Median over interleaved rounds of num / den timed in the same round."""
    return statistics.median(a / b for a, b in zip(num, den))
