"""Sweeps against DVC's own queue: 4 fine-tuning experiments through `python -m team.sweep` and through
`dvc queue start -j 2`, in one run, on the local 2-node Ray cluster or (`--local`) on one machine.

    unshare -n -- bash -c 'ip link set lo up && exec .venv/bin/python benchmarks/sweep.py'   # as root on Linux
    .venv/bin/python benchmarks/sweep.py --local

`--local`: the tiny project (tests/local_scenario.py) with no remote and the workspace's SQLite store, copied
once so that each round has its own DVC cache (no run-cache hits across rounds); the one-machine sweep of the
4 learning rates, 2 at a time, 1 thread each (its wall time: the whole command, private MLflow server
included), then `dvc queue start -j 2` on the copy (a hang shows as a lost trial: fewer than 4 finished).
Writes benchmarks/results/sweep_local.json. Goal: the sweep within 1.05 x the queue's time, every trial finished.

Without `--local`:

Ray listens on every interface, so this runs only inside a loopback-only network namespace (or with
ALLOW_NETWORK=1). The setup is the cluster tests' (tests/cluster_scenario.py): the team tracking server,
a bare git `origin`, a folder DVC remote, the tiny project (3 digit classes x 12 images, 32 px, one
candidate, one epoch per phase, ONNX only) after `dvc repro`, pushed with its run cache, and a Ray head
plus one worker node, 1 CPU each. Both rounds run the same 4 learning rates of the full phase
(finetune, evaluate and export re-run in each experiment), one CPU thread per experiment, 2 at a time:
- cluster: the sweep's wall time, and per trial the seconds of each step; the overhead is what a
  trial does besides `dvc exp run` (git ls-remote, clone + checkout, dvc pull --run-cache, dvc exp push), in seconds
  and as a fraction of the trial;
- queue: `dvc exp run --queue` x 4, `dvc queue start -j 2`, until the 4 experiment refs exist (known to
  hang at times, upstream #10673: after --timeout the round is recorded as hung and the queue killed);
  wall_seconds from `dvc queue start`, with_queueing_seconds from the first `dvc exp run --queue`.
  The cluster's wall time is the whole `python -m team.sweep` command (checks, connecting to Ray,
  the trials, `dvc exp pull`, MLflow tags, reports).
Writes benchmarks/results/sweep.json (with the load average before and after each round).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cluster_scenario import Setup  # noqa: E402  (tests/cluster_scenario.py: the shared setup)
from machine import write_result  # noqa: E402

from stages.lib.core.threads import live_queue_workers  # noqa: E402

RATES = ["7e-4", "3e-4", "2e-4", "1.5e-4"]  # not the tiny recipe's 5e-4: that trial would run no stage
OVERHEAD_STEPS = ("git ls-remote", "git clone", "git checkout", "git config", "dvc pull", "dvc exp push")


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cluster_round(setup: Setup) -> dict:
    before = load()
    started = time.perf_counter()
    result = setup.sweep(
        "--name",
        "bench",
        "-S",
        f"finetune.phases.1.lr={','.join(RATES)}",
        "--cpus",
        "1",
        "--max-concurrent",
        "2",
        "--objective",
        "metrics/evaluate.json:finetuned.val.accuracy",
        timeout=3600,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"the sweep failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    trials = json.loads((setup.project / "reports/sweeps/bench.json").read_text())
    per_trial = []
    for trial in trials:
        timings = trial.get("timings") or {}
        overhead = sum(seconds for step, seconds in timings.items() if step in OVERHEAD_STEPS)
        per_trial.append(
            {
                "trial": trial["name"],
                "node": trial["node"],
                "duration_s": trial["duration_s"],
                "timings": timings,
                "overhead_s": round(overhead, 2),
                "overhead_fraction": round(overhead / trial["duration_s"], 3) if trial["duration_s"] else None,
            }
        )
    return {
        "wall_seconds": round(wall, 1),
        "load_before": before,
        "load_after": load(),
        "trials": per_trial,
        "overhead_s_mean": round(statistics.fmean(t["overhead_s"] for t in per_trial), 2),
        "overhead_fraction_mean": round(statistics.fmean(t["overhead_fraction"] for t in per_trial), 3),
    }


def exp_refs(project: Path) -> set[str]:
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project, capture_output=True, text=True
    ).stdout
    return {
        ref.rsplit("/", 1)[1] for ref in refs.split() if re.fullmatch(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/[^/]+", ref)
    }


def queue_round(project: Path, env: dict, timeout_s: float) -> dict:
    names = [f"queue-{i + 1:02d}" for i in range(len(RATES))]

    def dvc_env(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(Path(sys.executable).parent / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True
        )

    before = load()
    queueing = time.perf_counter()
    for name, rate in zip(names, RATES):
        queued = dvc_env("exp", "run", "--queue", "-n", name, "-S", f"finetune.phases.1.lr={rate}")
        assert queued.returncode == 0, queued.stderr
    started = time.perf_counter()
    dvc_env("queue", "start", "-j", "2")
    hung = False
    while not set(names) <= exp_refs(project):
        if time.perf_counter() - started > timeout_s:
            hung = True
            dvc_env("queue", "kill", *[n for n in names if n not in exp_refs(project)])
            break
        time.sleep(1)
    wall = time.perf_counter() - started
    deadline = time.monotonic() + 120  # the workers leave once the queue is empty
    while live_queue_workers(project) and time.monotonic() < deadline:
        time.sleep(1)
    if live_queue_workers(project):
        dvc_env("queue", "stop", "--kill")
    return {
        "wall_seconds": round(wall, 1),
        "with_queueing_seconds": round(time.perf_counter() - queueing, 1),
        "hung": hung,
        "finished": sorted(set(names) & exp_refs(project)),
        "load_before": before,
        "load_after": load(),
    }


def local_round(project: Path, env: dict) -> dict:
    """The one-machine sweep (no remotes, the workspace's SQLite store): the whole command's wall time."""
    before = load()
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "team.sweep", "--name", "bench", "-S", f"finetune.phases.1.lr={','.join(RATES)}"]
        + ["--cpus", "1", "--max-concurrent", "2"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = time.perf_counter() - started
    print(result.stderr[-3000:], flush=True)
    trials = json.loads((project / "reports/sweeps/bench.json").read_text()) if result.returncode in (0, 1) else []
    return {
        "wall_seconds": round(wall, 1),
        "returncode": result.returncode,
        "finished": sorted(t["name"] for t in trials if t["status"] == "ok"),
        "trials": [{k: t[k] for k in ("name", "status", "duration_s", "timings")} for t in trials],
        "load_before": before,
        "load_after": load(),
    }


def write_local_rows(result_path: Path) -> Path:
    """The rows for benchmarks/measured/sweep_local_vs_queue.csv from a `--local` result, beside it."""
    result = json.loads(result_path.read_text())

    def average(uptime: str) -> str:
        return uptime.split("average:")[-1].split(",")[0].strip()

    day = str(result["environment"].get("time", ""))[:10]
    csv_path = result_path.with_name("sweep_local_vs_queue.csv")
    with open(csv_path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["side", "experiments", "at_once", "finished", "wall_s", "source"])
        for side, key in (
            ("python -m team.sweep on one machine (whole command)", "local"),
            ("dvc queue start -j 2 until the 4 refs exist", "queue"),
        ):
            measured = result[key]
            source = (
                f"benchmarks/sweep.py --local {day}, tiny recipe, one epoch per phase, 1 thread per trial, "
                f"2 shared cores, load {average(measured['load_before'])} -> {average(measured['load_after'])}"
            )
            finished = len(measured["finished"])
            writer.writerow([side, len(result["rates"]), 2, finished, measured["wall_seconds"], source])
    return csv_path


def local_main(args: argparse.Namespace) -> int:
    """--local: the one-machine sweep against `dvc queue start -j 2`, each on its own copy of one project."""
    import shutil

    from local_scenario import Project  # tests/local_scenario.py: the tiny project, no remotes, committed

    root = Path(tempfile.mkdtemp(prefix="sbl-", dir="/tmp"))
    try:
        project = Project(root)
        env = project.env() | {"PIPELINE_THREADS": "1"}
        queue_copy = root / "queue-project"
        shutil.copytree(project.path, queue_copy, symlinks=True)  # its own cache: no run-cache hits across rounds
        local = local_round(project.path, env)
        print(f"one machine: {local['wall_seconds']:.0f} s, {len(local['finished'])} of 4 finished", flush=True)
        queue = queue_round(queue_copy, env, args.queue_timeout)
        print(f"dvc queue -j 2: {queue['wall_seconds']:.0f} s, {len(queue['finished'])} of 4 finished", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = round(local["wall_seconds"] / queue["wall_seconds"], 3)
    met = ratio <= 1.05 and len(local["finished"]) == len(RATES)
    row = {
        "name": "sweep on one machine: 4 trials 2 at a time vs dvc queue -j 2",
        "unit": "s",
        "pipeline": local["wall_seconds"],
        "baseline": queue["wall_seconds"],
        "baseline_name": "dvc queue start -j 2",
        "ratio": round(queue["wall_seconds"] / local["wall_seconds"], 3),
        "goal": "local <= 1.05 x queue, 4 of 4 finished",
        "met": met,
    }
    path = write_result(
        args.out_stem, {"rates": RATES, "local": local, "queue": queue, "ratio_local_over_queue": ratio}, [row]
    )
    print(f"local / queue wall time: {ratio} (goal <= 1.05, every trial finished: {met}) | {path}")
    csv_path = write_local_rows(path)
    print(f"rows: {csv_path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-timeout", type=float, default=1200, help="seconds before the queue counts as hung")
    parser.add_argument("--out-stem", default=None, help="benchmarks/results/<stem>.json (sweep, sweep_local)")
    parser.add_argument(
        "--local", action="store_true", help="the one-machine sweep (no remotes, no server, no Ray) against the queue"
    )
    args = parser.parse_args()
    args.out_stem = args.out_stem or ("sweep_local" if args.local else "sweep")
    if args.local:
        return local_main(args)
    from team.cluster import check_loopback_only

    check_loopback_only(os.environ.get("ALLOW_NETWORK") in ("1", "yes"))
    root = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))
    root.chmod(0o755)
    setup = Setup(root)
    try:
        setup.start()
        cluster = cluster_round(setup)
        print(
            f"cluster: {cluster['wall_seconds']:.0f} s for {len(RATES)} trials; overhead per trial "
            f"{cluster['overhead_s_mean']:.1f} s ({cluster['overhead_fraction_mean']:.0%} of a trial)",
            flush=True,
        )
        queue = queue_round(setup.project, setup.env(ray=False, PIPELINE_THREADS="1"), args.queue_timeout)
        print(
            f"dvc queue -j 2: {queue['wall_seconds']:.0f} s ({queue['with_queueing_seconds']:.0f} s with queueing)"
            f"{' (HUNG)' if queue['hung'] else ''}",
            flush=True,
        )
    finally:
        setup.stop()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    ratio = round(cluster["wall_seconds"] / queue["wall_seconds"], 3) if not queue["hung"] else None
    row = {
        "name": "sweep: 4 trials, 2-node Ray vs dvc queue -j 2",
        "unit": "s",
        "pipeline": cluster["wall_seconds"],
        "baseline": queue["wall_seconds"],
        "baseline_name": "dvc queue start -j 2",
        "ratio": round(queue["wall_seconds"] / cluster["wall_seconds"], 3),
        "goal": None,
        "met": None,
    }
    path = write_result(
        args.out_stem, {"rates": RATES, "cluster": cluster, "queue": queue, "ratio_cluster_over_queue": ratio}, [row]
    )
    print(f"cluster / queue wall time: {ratio} | {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
