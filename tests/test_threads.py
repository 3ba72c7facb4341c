"""The thread budget: the arithmetic, counting `dvc queue` workers, and a stage process getting it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.lib.core.errors import PipelineError
from stages.lib.core.threads import QUEUE_WORKERS_DIR, decide, live_queue_workers, queue_workers

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cores, sharers, threads, loader_workers",
    [
        (2, 1, 2, 1),  # alone: every core, one DataLoader worker beside the main process
        (2, 2, 1, 0),  # dvc queue start -j 2 on 2 cores: one thread each, no loader processes
        (16, 3, 5, 4),  # rounds down: 3 x 5 threads fit in 16 cores
        (1, 4, 1, 0),  # never below one thread
    ],
)
def test_the_cores_are_divided_among_the_processes_sharing_them(cores, sharers, threads, loader_workers):
    budget = decide(cores, sharers)
    assert (budget.threads, budget.interop, budget.loader_workers) == (threads, threads, loader_workers)
    assert budget.workers(4) == loader_workers and budget.workers(0) == 0


def test_pipeline_threads_overrides_and_omp_num_threads_caps():
    assert decide(16, 4, requested="6").threads == 6  # the setting wins over the division
    assert decide(16, 1, requested="2", cap="1").threads == 2  # ... and over OMP_NUM_THREADS
    assert decide(16, 2, cap="3").threads == 3  # a user's OMP_NUM_THREADS caps the default
    assert decide(2, 1, cap="8").threads == 2  # but never raises it


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_setting_is_one_clear_error(value):
    with pytest.raises(PipelineError, match=rf"PIPELINE_THREADS='{value}': expected a whole number of threads >= 1"):
        decide(2, 1, requested=value)


def fake_worker() -> subprocess.Popen:
    """A live process named like a DVC queue worker, returned once /proc shows its command line (a just
    started child may still show its parent's, or none at all)."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "exp", "queue-worker"])
    cmdline, deadline = Path(f"/proc/{worker.pid}/cmdline"), time.monotonic() + 10
    while time.monotonic() < deadline and worker.poll() is None:
        if not cmdline.exists() or b"queue-worker" in cmdline.read_bytes():
            return worker
        time.sleep(0.01)
    worker.kill()
    raise AssertionError(f"the fake worker did not start (exit code {worker.poll()})")


@pytest.fixture
def fake_queue(tmp_path):
    """A repository whose DVC queue records three workers the way `dvc queue start` does: one alive
    (a real process named like a worker), one whose process is gone, one DVC marked as ended."""
    records = tmp_path / QUEUE_WORKERS_DIR
    records.mkdir(parents=True)
    worker = fake_worker()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        (records / "dvc-exp-worker-1.pid").write_text(str(worker.pid))
        (records / "dvc-exp-worker-1.json").write_text(json.dumps({"pid": worker.pid, "returncode": None}))
        (records / "dvc-exp-worker-2.pid").write_text(str(gone.pid))
        (records / "dvc-exp-worker-3.pid").write_text(str(os.getpid()))
        (records / "dvc-exp-worker-3.json").write_text(json.dumps({"pid": os.getpid(), "returncode": 0}))
        yield tmp_path, worker
    finally:
        worker.kill()
        worker.wait()


def test_only_live_queue_workers_count(fake_queue):
    root, worker = fake_queue
    assert live_queue_workers(root) == 1
    worker.kill()
    worker.wait()
    assert live_queue_workers(root) == 0


def test_the_queue_counts_only_inside_a_queued_experiment(fake_queue):
    root, _ = fake_queue
    copy = root / ".dvc/tmp/exps/tmpabc123"
    copy.mkdir(parents=True)
    queued = {"DVC_ROOT": str(root), "DVC_EXP_NAME": "exp-1"}
    assert queue_workers(queued, cwd=copy) == 1
    # a second live worker
    record = root / QUEUE_WORKERS_DIR / "dvc-exp-worker-2.pid"
    other = fake_worker()
    try:
        record.write_text(str(other.pid))
        assert queue_workers(queued, cwd=copy) == 2
        assert queue_workers(queued, cwd=root) == 1  # dvc exp run in the workspace
        assert queue_workers({"DVC_ROOT": str(root)}, cwd=copy) == 1  # dvc repro: no experiment
    finally:
        other.kill()
        other.wait()


STAGE_START = """
import json, os, torch
from stages.lib.core.stage import setup_stage
setup_stage()
from stages.lib.core import threads
print(json.dumps({"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                  "omp": os.environ["OMP_NUM_THREADS"], "loader": threads.apply().workers(8)}))
"""


def stage_budget(env: dict, cwd: Path) -> dict:
    """What a process starting like a stage (torch imported, then setup_stage) ends up with."""
    result = subprocess.run(
        [sys.executable, "-c", STAGE_START],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "thread budget:" in result.stderr
    return json.loads(result.stdout)


def clean_env() -> dict:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PIPELINE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE")
        and not k.startswith("DVC_")
    }


def test_a_stage_process_gets_the_setting(tmp_path):
    got = stage_budget({**clean_env(), "PIPELINE_THREADS": "3"}, tmp_path)
    assert got == {"threads": 3, "interop": 3, "omp": "3", "loader": 2}


def test_a_stage_in_a_queued_experiment_gets_its_share_of_the_cores(fake_queue):
    root, _ = fake_queue
    copy = root / ".dvc/tmp/exps/tmpabc123"
    copy.mkdir(parents=True)
    other = fake_worker()
    try:
        (root / QUEUE_WORKERS_DIR / "dvc-exp-worker-2.pid").write_text(str(other.pid))
        got = stage_budget({**clean_env(), "DVC_ROOT": str(root), "DVC_EXP_NAME": "exp-1"}, copy)
    finally:
        other.kill()
        other.wait()
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert got == {"threads": share, "interop": share, "omp": str(share), "loader": share - 1}
