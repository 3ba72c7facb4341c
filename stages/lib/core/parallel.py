"""Per-file work (decoding, hashing) spread over worker processes, results in input order.

`ordered_map(function, items, workers)` yields `function(item)` for every item, in the order of
`items`, whatever the number of workers: callers stream the results into a memmap or a table
and get byte-identical outputs for any `workers`. Items go to the workers in chunks of
`chunksize`, at most `window` items in flight (a new chunk leaves when the oldest one's results
are taken), so memory stays flat however many files there are. One worker runs in this
process, without a pool.

Workers are forked on Linux (nothing re-imported: they start in milliseconds); elsewhere the
platform's default start method is used, which re-imports the caller's module in each worker.
`function` must be picklable (a module-level function or a functools.partial of one).

The caller may be a long-lived process with threads and signal handlers of its own (a test run, a
notebook, a server), so a worker starts with SIGINT ignored and SIGTERM at its default action, and
with stdout/stderr objects of its own (another thread may have held the caller's locks at the moment
of the fork). The pool ends by closing: workers finish the chunks in flight and exit. Only an
interrupt of the caller (Ctrl-C, or a SIGTERM it turns into one) kills them.
"""

from __future__ import annotations

import collections
import io
import itertools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

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


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if getattr(sys, name) is not None:
            setattr(sys, name, io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), line_buffering=True))


def _apply(function: Callable[[Item], Result], chunk: list[Item]) -> list[Result]:
    return [function(item) for item in chunk]


def ordered_map(
    function: Callable[[Item], Result],
    items: Iterable[Item],
    workers: int | None = None,
    chunksize: int = 16,
    window: int | None = None,
) -> Iterator[Result]:
    """`function(item)` for each item, in order, computed by `worker_count(workers)` processes.

    chunksize: items per task sent to a worker (fewer messages; too large unbalances the last chunks).
    window: items in flight at most (default 4 chunks per worker): a new chunk is sent as soon as the
    oldest one's results are taken, so workers never wait for a batch to drain, and memory holds at
    most a window of results.
    """
    workers = worker_count(workers)
    if workers == 1:
        yield from map(function, items)
        return
    in_flight = max(1, (window or workers * chunksize * 4) // chunksize)
    iterator = iter(items)
    chunks = iter(lambda: list(itertools.islice(iterator, chunksize)), [])
    first = list(itertools.islice(chunks, in_flight))
    if not first:
        return
    pool = _context().Pool(workers, initializer=_start_worker)
    try:
        pending = collections.deque(pool.apply_async(_apply, (function, chunk)) for chunk in first)
        while pending:
            results = pending.popleft().get()
            for chunk in itertools.islice(chunks, 1):
                pending.append(pool.apply_async(_apply, (function, chunk)))
            yield from results
    except KeyboardInterrupt:
        pool.terminate()
        raise
    finally:
        pool.close()  # also when the caller stops early or a worker raised: a window of chunks still runs
        pool.join()
