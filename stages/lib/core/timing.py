"""Wall-clock timing, the one way this project measures latency and throughput: the leaderboard's
per-candidate latency, export's per-variant latency and the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")


def timed(function: Callable[[], Result], synchronize: Callable[[], None] | None = None) -> tuple[float, Result]:
    """(wall seconds, result) of one call. `synchronize` (e.g. `torch.cuda.synchronize`) runs before and
    after, so queued device work counts."""
    if synchronize:
        synchronize()
    started = time.perf_counter()
    result = function()
    if synchronize:
        synchronize()
    return time.perf_counter() - started, result


def median_seconds(
    function: Callable[[], object], repeats: int, max_seconds: float, warmup: int = 1, min_runs: int = 1
) -> tuple[float, int]:
    """(median wall seconds of one call, timed calls). After `warmup` untimed calls, times at most `repeats`
    calls and stops once `max_seconds` have been spent timing and `min_runs` calls were timed: the cost of
    measuring is bounded whatever the function and the machine."""
    for _ in range(warmup):
        function()
    timings: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(timings) < repeats and (len(timings) < min_runs or time.perf_counter() < deadline):
        timings.append(timed(function)[0])
    return statistics.median(timings), len(timings)
