"""Metrics files and flat numbers: DVC's metrics JSON files hold nested headline numbers; MLflow params and
metrics are flat (`a.b.0`)."""

from __future__ import annotations

import json
from pathlib import Path

from stages.lib.core.pipeline import metrics_files


def pipeline_metrics() -> dict[str, float]:
    """Every metrics file of dvc.yaml, flattened as `<file stem>.<key>`: the execution's headline numbers."""
    numbers = {}
    for path in map(Path, metrics_files()):
        if path.is_file():
            numbers |= numeric_leaves(json.loads(path.read_text()), path.stem)
    return numbers


def flatten(value, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': [1, 2]}} -> {'a.b.0': 1, 'a.b.1': 2}: MLflow params and metrics are flat."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)) and any(isinstance(item, (dict, list)) for item in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def numeric_leaves(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested metrics mapping, flattened: {'a': {'b': 1, 'c': 'x'}} -> {'a.b': 1.0}."""
    return {
        key: float(value)
        for key, value in flatten(metrics, prefix).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def write_metrics(path: str | Path, metrics: dict, log_to_mlflow: bool = True) -> None:
    """Write a DVC metrics JSON and mirror its numeric leaves into the active MLflow run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if log_to_mlflow:
        import mlflow

        mlflow.log_metrics(numeric_leaves(metrics))
