"""dvc.yaml as the stages see it: each stage's outs, deps and params sections, read from DVC's own
pipeline file in the working copy the stage runs in. The params a stage declares there are the only list
of them: MLflow params and checkpoint fingerprints derive from it."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

PIPELINE_FILE = Path("dvc.yaml")


def pipeline_stages() -> dict:
    """The `stages` of dvc.yaml, as written (empty when there is none, e.g. in unit tests). Read once
    per file version: a stage asks for it a dozen times, at its start and at its end."""
    try:
        return _read_stages(PIPELINE_FILE.resolve(), PIPELINE_FILE.stat().st_mtime_ns)
    except OSError:
        return {}


@functools.lru_cache(maxsize=8)
def _read_stages(path: Path, mtime_ns: int) -> dict:
    try:  # libyaml's loader when PyYAML has it (ten times faster); DVC reports a broken dvc.yaml itself
        return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)).get("stages") or {}
    except (AttributeError, yaml.YAMLError):
        return {}


def _paths(entries) -> list[str]:
    """Paths of a dvc.yaml outs/deps/metrics list (plain strings or {path: options})."""
    return [next(iter(entry)) if isinstance(entry, dict) else str(entry) for entry in entries or []]


def stage_outputs(stage: str) -> list[str]:
    return _paths(pipeline_stages().get(stage, {}).get("outs"))


def metrics_files() -> list[str]:
    """Every metrics file dvc.yaml declares, in pipeline order."""
    return [path for spec in pipeline_stages().values() for path in _paths(spec.get("metrics"))]


def upstream_stages(stage: str) -> list[str]:
    """The stages whose outs this stage depends on (from dvc.yaml)."""
    stages = pipeline_stages()
    deps = set(_paths(stages.get(stage, {}).get("deps")))
    return [name for name, spec in stages.items() if name != stage and deps & set(_paths(spec.get("outs")))]


def stage_params(stage: str) -> list[str]:
    """The params keys `stage` declares in dvc.yaml (sections such as `finetune`, or keys such as
    `model.image_size`), in the order written."""
    return [str(entry) for entry in pipeline_stages().get(stage, {}).get("params") or []]


def pipeline_params() -> list[str]:
    """Every params key any stage declares, in pipeline order, without duplicates: what defines an execution."""
    keys: list[str] = []
    for stage in pipeline_stages():
        keys += [key for key in stage_params(stage) if key not in keys]
    return keys
