"""A sweep on one machine with nothing set up, end to end, inside a loopback-only network namespace.

    unshare -n -- bash -c 'ip link set lo up && exec python tests/local_scenario.py [PROJECT]'

tests/test_sweep_local.py runs it so, on a copy of the session's `tiny_pipeline` (PROJECT: a tiny project
after one complete `dvc repro`; without it, the cluster tests' tiny project is made and reproduced first),
committed, with no git remote, no DVC remote, no RAY_ADDRESS and no
MLFLOW_TRACKING_URI: the workspace's own SQLite store. The trials change only evaluate's params, so each
runs the evaluate stage and takes every other stage's outputs from the shared DVC cache (run cache).
Then, in this order:
  refusals  more CPUs or GPUs than the machine has, uncommitted changes: exit 2, one line, nothing runs
  grid      a 4-trial grid (2 top_k x 2 error_gallery), 2 at once; one trial's `dvc exp run` SIGKILLed
            while a stage runs (as the OOM killer would): retried; once two experiments are in the workspace
            the driver gets SIGINT (Ctrl-C): it exits 130 and every process it started is gone (trials,
            the private MLflow server)
  resume    the same command again: the finished trials are not run again, the others are; then
            `dvc exp show` lists the 4 experiments, `dvc exp apply` brings one in, the store holds 4
            FINISHED parent runs tagged with the sweep (a retried trial's attempts share one) and no run
            RUNNING (the killed attempts' stage runs are marked KILLED)
Each prints `SCENARIO <name> OK <seconds>`; at the end nothing of the project may be left running.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster_scenario import SWEEP_PARAMS  # noqa: E402
from conftest import BIN, dvc, make_project, pipeline_env, run  # noqa: E402
from scenario import log, play, processes  # noqa: E402

NAMES = ["local-01", "local-02", "local-03", "local-04"]
GRID = [
    "--name",
    "local",
    "-S",
    "evaluate.top_k=2,4",  # none is the baseline's recipe (3, 4): every trial runs evaluate, and only evaluate
    "-S",
    "evaluate.error_gallery=2,3",
    "--objective",
    "metrics/evaluate.json:finetuned.val.accuracy",
    "--max-concurrent",
    "2",
    "--retries",
    "1",
]


class Project:
    def __init__(self, root: Path, source: Path | None = None):
        """A copy of `source` (a project after `dvc repro`: its DVC cache, run cache and MLflow store), or
        without one the cluster tests' tiny project after `dvc repro`; committed."""
        self.root = root
        self.path = root / "project"
        if source:
            shutil.copytree(source, self.path, symlinks=True)
        else:
            make_project(self.path, overrides=SWEEP_PARAMS, classes=3)
            repro = subprocess.run(
                [str(BIN / "dvc"), "repro"], cwd=self.path, capture_output=True, text=True, env=self.env()
            )
            assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
        run(self.path, "git", "add", "-A")
        run(self.path, "git", "commit", "-qm", "baseline results")
        assert run(self.path, "git", "remote").stdout.strip() == "", "the project must have no remote"

    def env(self) -> dict:
        return pipeline_env() | {
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),  # this checkout's team package
            "LOG_LEVEL": "INFO",
            "SWEEP_SCRATCH": str(self.root / "scratch"),
            "OMP_NUM_THREADS": "1",
        }

    def sweep(self, *args: str, background: bool = False):
        command = [sys.executable, "-m", "team.sweep", *args]
        log("$ python -m team.sweep " + " ".join(args))
        if background:
            return subprocess.Popen(
                command,
                cwd=self.path,
                env=self.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        result = subprocess.run(command, cwd=self.path, env=self.env(), capture_output=True, text=True, timeout=900)
        print(result.stdout + result.stderr, flush=True)
        return result

    def experiments(self) -> set[str]:
        refs = run(self.path, "git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
        return {ref.rsplit("/", 1)[1] for ref in refs if ref.count("/") == 4}

    def parent_runs(self) -> list[tuple[str, str, str]]:
        """(experiment name, status, sweep.name) of every parent run in the store, read with sqlite3."""
        with sqlite3.connect(self.path / "mlflow.db") as db:
            rows = db.execute(
                "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = 'stage' AND t.value = 'pipeline'"
            ).fetchall()
            tags = {
                (run_id, key): value
                for run_id, key, value in db.execute(
                    "SELECT run_uuid, key, value FROM tags WHERE key IN ('dvc.exp_name', 'sweep.name')"
                )
            }
        return [(tags.get((r, "dvc.exp_name"), ""), status, tags.get((r, "sweep.name"), "")) for r, status in rows]

    def running_runs(self) -> int:
        with sqlite3.connect(self.path / "mlflow.db") as db:
            return db.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]


def descendants(root: int) -> set[int]:
    """Every live process below `root` (children, grandchildren, ...)."""
    table = processes()
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid, _ in table if ppid in frontier and pid not in found}
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    live = {pid for pid, _, _ in processes()}
    return pids & live


# ------------------------------------------------------------------------------------- scenarios
def refusals(p: Project) -> None:
    grid = ["--name", "refused", "-S", "finetune.phases.1.lr=1e-3,2e-3"]
    result = p.sweep(*grid, "--cpus", "512")
    assert result.returncode == 2 and "asks 512 CPUs but this machine has" in result.stderr, result
    result = p.sweep(*grid, "--gpus", "1")
    assert result.returncode == 2 and "asks 1 GPUs but this machine has 0" in result.stderr, result
    params = p.path / "params.yaml"
    saved = params.read_text()
    params.write_text(saved.replace("seed: 42", "seed: 43"))
    try:
        result = p.sweep(*grid)
        assert result.returncode == 2 and "uncommitted changes" in result.stderr, result
    finally:
        params.write_text(saved)
    assert not p.experiments(), "a refused sweep made an experiment"


def grid(p: Project) -> None:
    """Kill one trial's `dvc exp run` mid-stage, then interrupt the driver once two experiments are in."""
    process = p.sweep(*GRID, background=True)
    started: set[int] = set()
    killed = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        started |= descendants(process.pid)
        table = processes()
        if killed is None:
            for pid, _, cmdline in table:
                stage_running = any(ppid == pid and "stages." in cmd for _, ppid, cmd in table)
                if "exp run -n local-02 " in cmdline and "dvc" in cmdline and stage_running:
                    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
                    killed = pid
                    log(f"SIGKILLed local-02's dvc exp run {pid} mid-stage")
        if killed and len(p.experiments()) >= 2:  # the resume then runs the last two trials at once
            break
        time.sleep(0.3)
    assert process.poll() is None, f"the sweep ended early:\n{process.stdout.read()}"
    assert killed, "local-02 never ran a stage"
    started |= descendants(process.pid)
    os.kill(process.pid, signal.SIGINT)  # Ctrl-C
    log(f"SIGINT to the driver with {sorted(p.experiments())} in the workspace; it had started {len(started)} PIDs")
    output, _ = process.communicate(timeout=120)
    print(output, flush=True)
    assert process.returncode == 130, f"the interrupted sweep exited {process.returncode}"
    assert "killed (signal 9); retry 1 of 1" in output, "the killed trial was not retried"
    assert len(p.experiments()) < 4, "every trial finished before the interrupt: the resume would run none"
    assert "mlflow server" not in " ".join(c for _, _, c in processes() if str(p.path) in c)
    time.sleep(1)
    left = alive(started)
    assert not left, f"left running after SIGINT: {[(q, c[:80]) for q, _, c in processes() if q in left]}"


def resume(p: Project) -> None:
    done_before = p.experiments()
    result = p.sweep(*GRID)
    assert result.returncode == 0, f"exit {result.returncode}"
    assert f"{len(done_before)} already in the workspace" in result.stderr, result.stderr[-2000:]
    assert "4 of 4 trials finished" in result.stdout, result.stdout
    assert p.experiments() == set(NAMES), p.experiments()
    shown = dvc(p.path, "exp", "show", "--csv").stdout
    listed = sorted(row["Experiment"] for row in csv.DictReader(shown.splitlines()) if row.get("Experiment"))
    assert listed == NAMES, listed
    parents = p.parent_runs()
    finished = sorted(name for name, status, sweep in parents if status == "FINISHED" and sweep == "local")
    assert finished == NAMES, parents
    assert p.running_runs() == 0, f"{p.running_runs()} runs left RUNNING: {parents}"
    rows = list(csv.DictReader((p.path / "reports/sweeps/local.csv").open()))
    assert [r["status"] for r in rows].count("ok") == 4 - len(done_before), rows
    dvc(p.path, "exp", "apply", "local-03")
    assert "top_k: 4" in (p.path / "params.yaml").read_text()
    status = dvc(p.path, "status").stdout
    assert "changed outs" not in status and "deleted" not in status, status  # its outputs came from the cache


SCENARIOS = {"refusals": refusals, "grid": grid, "resume": resume}


def main(source: Path | None) -> int:
    root = Path(tempfile.mkdtemp(prefix="ls-", dir="/tmp"))
    return play(SCENARIOS, root, lambda: Project(root, source), lambda: None, lambda command: str(root) in command)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve() if sys.argv[1:] else None))
