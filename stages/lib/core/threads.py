"""The CPU thread budget of one pipeline process, so parallel workers share the machine.

Every stage calls `apply()` (through `setup_stage()`) before it does any work. The budget is

- `PIPELINE_THREADS` when set (a whole number >= 1): the one setting a user changes;
- otherwise the cores this process may run on (`os.sched_getaffinity`), divided by the number of
  processes that share them: the live `dvc queue start -j N` workers of this repository when the
  stage runs inside a queued experiment, times the processes per node under `torchrun`
  (`LOCAL_WORLD_SIZE`); an `OMP_NUM_THREADS` set by the user caps it.

DVC tells a stage neither N nor that a queue runs it (it sets only DVC_ROOT, DVC_STAGE,
DVC_EXP_NAME and DVC_EXP_BASELINE_REV), so the workers are counted from the records DVC keeps for
them: `dvc queue start -j N` spawns N processes `dvc exp queue-worker ...` and writes each one's
pid to `<DVC_ROOT>/.dvc/tmp/exps/celery/dvc-exp-worker-<n>.pid`. Counted when each stage starts,
the budget grows again when a worker has left (the queue emptied).

The budget sets torch's intra-op and inter-op threads, OpenMP/MKL/OpenBLAS threads (the
environment, for libraries loaded later, and `threadpoolctl` for those already loaded) and caps
DataLoader worker processes at budget - 1 (the main process keeps a core).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from stages.lib.core.errors import PipelineError
from stages.lib.core.parallel import available_cores

log = logging.getLogger(__name__)

ENV = "PIPELINE_THREADS"
QUEUE_WORKERS_DIR = Path(".dvc/tmp/exps/celery")  # where `dvc queue start` records its workers
EXPERIMENTS_DIR = Path(".dvc/tmp/exps")  # where `dvc exp run --queue/--temp` copies the repository
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class Budget:
    """What this process may use: `threads` for torch's intra-op pool and the BLAS/OpenMP libraries,
    `interop` for torch's inter-op pool, at most `loader_workers` DataLoader worker processes.
    `reason` says where the number came from (logged once)."""

    threads: int
    interop: int
    loader_workers: int
    reason: str

    def workers(self, requested: int) -> int:
        """DataLoader worker processes for a request of `requested` (finetune.workers)."""
        return min(requested, self.loader_workers)


def _positive_int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise PipelineError(f"{name}={value!r}: expected a whole number of threads >= 1")
    return number


def decide(cores: int, sharers: int = 1, requested: str | None = None, cap: str | None = None) -> Budget:
    """The budget (pure arithmetic, no side effects).

    cores: cores available to the process; sharers: processes splitting them (queue workers x
    torchrun processes per node); requested: the value of PIPELINE_THREADS, if set; cap: a user's
    OMP_NUM_THREADS, if set (ignored when `requested` is given).
    """
    if requested is not None and requested.strip():
        threads = _positive_int(ENV, requested)
        reason = f"{ENV}={threads}"
    else:
        threads = max(1, cores // max(1, sharers))
        reason = f"{cores} cores / {max(1, sharers)} process(es)"
        if cap is not None and cap.strip():
            limit = _positive_int("OMP_NUM_THREADS", cap)
            if limit < threads:
                threads, reason = limit, f"{reason}, capped by OMP_NUM_THREADS={limit}"
    return Budget(threads=threads, interop=threads, loader_workers=threads - 1, reason=reason)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # guard against a recycled pid
        try:
            return b"queue-worker" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def live_queue_workers(root: Path) -> int:
    """How many `dvc queue start` workers of the repository at root are running now."""
    count = 0
    for pid_file in (root / QUEUE_WORKERS_DIR).glob("dvc-exp-worker-*.pid"):
        info = pid_file.with_suffix(".json")
        try:
            if info.exists() and json.loads(info.read_text()).get("returncode") is not None:
                continue  # DVC recorded that it ended
            if _alive(int(pid_file.read_text().strip())):
                count += 1
        except (OSError, ValueError):
            continue  # a record being written or removed
    return count


def queue_workers(environ: dict | None = None, cwd: Path | None = None) -> int:
    """The live queue workers sharing the machine with this process when it runs inside a queued
    experiment (a copy under <DVC_ROOT>/.dvc/tmp/exps with DVC_EXP_NAME set), else 1."""
    environ = os.environ if environ is None else environ
    root = environ.get("DVC_ROOT")
    if not root or "DVC_EXP_NAME" not in environ:
        return 1
    cwd = (cwd or Path.cwd()).resolve()
    if not cwd.is_relative_to((Path(root) / EXPERIMENTS_DIR).resolve()):
        return 1  # `dvc exp run` in the workspace: no queue
    return max(1, live_queue_workers(Path(root)))


def current(environ: dict | None = None) -> Budget:
    """This process's budget, from its environment and the queue workers alive now."""
    environ = os.environ if environ is None else environ
    local_processes = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun's processes on this node
    return decide(
        available_cores(), queue_workers(environ) * local_processes, environ.get(ENV), environ.get("OMP_NUM_THREADS")
    )


_applied: Budget | None = None


def apply() -> Budget:
    """Decide the budget once per process and apply it; later calls return the same budget."""
    global _applied
    if _applied is not None:
        return _applied
    budget = current()
    for name in THREAD_VARIABLES:  # read by OpenMP/MKL/OpenBLAS (and torch) when they load
        os.environ[name] = str(budget.threads)
    if "torch" in sys.modules:  # already loaded: set its pools directly (torch reads OMP_NUM_THREADS otherwise)
        import torch

        torch.set_num_threads(budget.threads)
        try:
            torch.set_num_interop_threads(budget.interop)
        except RuntimeError:  # inter-op pool already started: it keeps its size
            log.debug("torch's inter-op pool was already started")
    if any(name in sys.modules for name in ("numpy", "sklearn")):
        from threadpoolctl import threadpool_limits

        threadpool_limits(budget.threads)  # BLAS/OpenMP libraries already loaded
    log.info(
        "thread budget: %d thread(s), %d DataLoader worker(s) at most (%s)",
        budget.threads,
        budget.loader_workers,
        budget.reason,
    )
    _applied = budget
    return budget
