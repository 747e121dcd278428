"""Timing helpers shared by the benchmarks (run as scripts: this folder is on sys.path)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def median_s(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Median seconds of `repeats` calls of `fn`, and the last call's result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out
