"""Sweeps on Ray against DVC's own queue: 4 fine-tuning experiments on the local 2-node cluster
(`python -m team.sweep`) and through `dvc queue start -j 2` on one machine, in one run.

    unshare -n -- bash -c 'ip link set lo up && exec .venv/bin/python benchmarks/sweep.py'   # as root on Linux

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


def queue_round(setup: Setup, timeout_s: float) -> dict:
    env = setup.env(ray=False, PIPELINE_THREADS="1")
    project = setup.project
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-timeout", type=float, default=1200, help="seconds before the queue counts as hung")
    parser.add_argument("--out-stem", default="sweep")
    args = parser.parse_args()
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
        queue = queue_round(setup, args.queue_timeout)
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
