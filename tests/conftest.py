"""Shared fixtures: a tiny copy of this project, run for real through `dvc repro`.

`make_project` copies the project's own files (what git tracks, minus generated results) into a
temporary git + DVC repository with a small slice of the digits and tiny params, so every
pipeline test exercises the same commands a user runs. `tiny_pipeline` is one such project
after a complete `dvc repro`, shared by the whole session; tests that change it make their own.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = [
    "stages",
    "scripts",
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvc/plots_template.html",
    ".dvcignore",
    ".gitignore",
    "ci",
    "data/corrections.csv",
]

# Small enough for CI on 2 cores: 12 images per class, 32 px, one epoch per phase.
TINY_PARAMS = {
    "split": {"max_per_class": 12},
    "model": {"image_size": 32, "interpolation": "bilinear"},  # a non-default filter: the contract is tested end to end
    "augment": {"preview_images": 8},
    "features": {"C": [1.0], "batch_size": 64},
    "finetune": {
        "batch_size": 32,
        "phases": [
            {"name": "head", "trainable": "head", "epochs": 1, "lr": 1.0e-3},
            {"name": "full", "trainable": "all", "epochs": 1, "lr": 5.0e-4},
        ],
    },
    "evaluate": {"error_gallery": 4, "heatmaps": 2},
}


def pytest_configure(config) -> None:
    """SIGTERM ends a test run as Ctrl-C does: fixtures are torn down and scenarios stop their servers. SIGINT
    gets Python's handler even where the run was started with it ignored (a shell's `cmd &`): an ignored
    SIGINT would be inherited by every process the tests start, and the tests that interrupt one would fail."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = (
            deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def pipeline_env() -> dict:
    """The environment a stage sees: this venv first on PATH, the local MLflow store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GX_ANALYTICS_ENABLED"] = "false"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run(project: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=project, env=pipeline_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(project, str(BIN / "dvc"), *args, check=check)


def write_params(project: Path, overrides: dict) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, overrides), sort_keys=False))


def make_project(
    root: Path, per_class: int = 12, overrides: dict | None = None, images: bool = True, classes: int | None = None
) -> Path:
    """A git + DVC repository with this project's code, tiny params and (optionally) digits: `per_class`
    images of each class, the first `classes` digits (None: all ten)."""
    root.mkdir(parents=True, exist_ok=True)
    if not (REPO / ".dvc/plots_template.html").is_file():  # written by `make install`
        subprocess.run(
            [sys.executable, "-m", "scripts.offline_plots", ".dvc/plots_template.html"], cwd=REPO, check=True
        )
    for name in PROJECT_FILES:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    write_params(root, deep_merge(TINY_PARAMS, overrides or {}))
    run(root, "git", "init", "-q")
    run(root, "git", "config", "user.email", "tests@example.com")
    run(root, "git", "config", "user.name", "tests")
    if images:
        digits = ["--classes", str(classes)] if classes else []
        run(
            root,
            sys.executable,
            "-m",
            "stages.demo_data",
            "--out",
            "data/images",
            "--per-class",
            str(per_class),
            *digits,
        )
        dvc(root, "add", "-q", "data/images")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "tiny project")
    return root


def mlflow_runs(project: Path):
    """All runs of the project's local MLflow store, as a DataFrame."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A tiny project after one complete `dvc repro` (read-only for the tests that use it)."""
    project = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    dvc(project, "repro")
    return project
