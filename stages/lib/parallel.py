"""Per-file work (decoding, hashing) spread over worker processes, results in input order.

`ordered_map(function, items, workers)` yields `function(item)` for every item, in the order of
`items`, whatever the number of workers: callers stream the results into a memmap or a table
and get byte-identical outputs for any `workers`. Items go to the workers in bounded windows
(`window` items at a time, sent in chunks of `chunksize`), so only a window's results are ever
in flight: memory stays flat however many files there are. One worker runs in this process,
without a pool.

Workers are forked on Linux (nothing re-imported: they start in milliseconds); elsewhere the
platform's default start method is used, which re-imports the caller's module in each worker.
`function` must be picklable (a module-level function or a functools.partial of one).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroups cpusets), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def worker_count(workers: int | None) -> int:
    """`workers` processes, or when None/0 one per available core."""
    return workers if workers else available_cores()


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], workers: int | None = None,
                chunksize: int = 16, window: int | None = None) -> Iterator[Result]:
    """`function(item)` for each item, in order, computed by `worker_count(workers)` processes.

    chunksize: items per message to a worker (fewer messages; too large unbalances the last chunks).
    window: items in flight at most (default 8 chunks per worker); bounds the memory held by results.
    """
    workers = worker_count(workers)
    if workers == 1:
        yield from map(function, items)
        return
    window = window or workers * chunksize * 8
    iterator = iter(items)
    with _context().Pool(workers) as pool:
        while batch := list(itertools.islice(iterator, window)):
            yield from pool.imap(function, batch, chunksize=max(1, min(chunksize, len(batch) // workers)))
