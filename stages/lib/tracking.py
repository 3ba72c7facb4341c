"""MLflow tracking shared by every stage: where runs go, how they are tagged and grouped.

- Store: `MLFLOW_TRACKING_URI` when set (a team server), else `sqlite:///<root>/mlflow.db`
  with artifacts under `<root>/mlartifacts/`. The root is `DVC_ROOT` (the real repository,
  also under `dvc exp run --temp/--queue`, which work in a temporary copy), else the git root.
- Tags on every run: stage, git commit and dirty flag, data version (md5 of the DVC-tracked
  image folder), DVC experiment name, and `upstream.<stage>` run ids of the runs that
  produced this stage's inputs (read from their lineage files).
- Grouping: the stage runs of one `dvc repro` / `dvc exp run` share a parent run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import yaml

from stages.lib import PipelineError
from stages.lib.params import Params

log = logging.getLogger(__name__)

LINEAGE_DIR = Path("reports/lineage")  # one <stage>.json per stage: the run that made its outs
PIPELINE_TAG = "pipeline.execution"
PIPELINE_WRITES = ("dvc.lock", "metrics", "plots", "**/.gitignore")  # git-tracked files that stages rewrite


class TrackingError(PipelineError, RuntimeError):
    """The MLflow store cannot be reached or used."""


# ---------------------------------------------------------------------------- where runs go
def repo_root() -> Path:
    """The real repository root: DVC_ROOT under DVC, else the git top level, else the cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    top = _git("rev-parse", "--show-toplevel")
    return Path(top).resolve() if top else Path.cwd().resolve()


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def _check_reachable(uri: str, experiment: str | None = None, timeout_s: float = 10.0) -> None:
    """Fail fast, before any work, when a tracking server does not answer or refuses these
    credentials: one authenticated GET (the experiment by name) with MLflow's own client settings
    (MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN, TLS options), no retries, timeout_s."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    who = f"user {creds.username!r}" if creds.username else "no user (MLFLOW_TRACKING_USERNAME is not set)"
    try:
        response = http_request(creds, "/api/2.0/mlflow/experiments/get-by-name", "GET", max_retries=0,
                                timeout=timeout_s, params={"experiment_name": experiment or "Default"})
    except MlflowException as error:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({error.message.splitlines()[0][:200]}). "
            "Start it (make server), or unset MLFLOW_TRACKING_URI to use the local SQLite store."
        ) from None
    if response.status_code == 401:
        raise TrackingError(
            f"MLflow tracking server {uri} refused the credentials of {who} (401: missing or wrong). "
            "Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to your account on that server."
        )
    if response.status_code == 403:
        raise TrackingError(
            f"MLflow tracking server {uri}: {who} has no permission on experiment {experiment!r} (403). "
            "Ask the server's admin for EDIT on it and on the registered model."
        )
    if response.status_code not in (200, 404):  # 404: the experiment does not exist yet, configure creates it
        raise TrackingError(f"MLflow tracking server {uri} answered {response.status_code}: {response.text[:200]}")


def configure(params: Params) -> str:
    """Point MLflow at the store and the experiment; return the experiment id."""
    import mlflow

    root = repo_root()
    uri = tracking_uri(root)
    _check_reachable(uri, params.mlflow.experiment)
    mlflow.set_tracking_uri(uri)
    name = params.mlflow.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        local = uri.startswith("sqlite:") or uri.startswith("file:")
        location = (root / "mlartifacts" / name).as_uri() if local else None
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# ------------------------------------------------------------------------------------ tags
def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def data_version(images_dir: str) -> str:
    """The md5 DVC recorded for the image folder (`<images_dir>.dvc`), or 'untracked'."""
    dvc_file = Path(images_dir.rstrip("/") + ".dvc")
    try:
        outs = yaml.safe_load(dvc_file.read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "untracked"


def run_tags(stage: str, params: Params) -> dict[str, str]:
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD") or "unknown"
    # what the pipeline itself rewrites (dvc.lock, metrics, plots) does not make the code dirty
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *[f":!{path}" for path in PIPELINE_WRITES])
    tags = {
        "stage": stage,
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "git.dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
        "data.version": data_version(params.data.images_dir),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def upstream_tags(upstream_stages: list[str]) -> dict[str, str]:
    """`upstream.<stage>: run id` for each upstream stage whose lineage file exists."""
    tags = {}
    for stage in upstream_stages:
        lineage = LINEAGE_DIR / f"{stage}.json"
        if lineage.exists():
            tags[f"upstream.{stage}"] = json.loads(lineage.read_text())["run_id"]
    return tags


# -------------------------------------------------------------------------------- grouping
def _process_ancestors() -> Iterator[tuple[int, list[str], str]]:
    """(pid, argv, start time) of each ancestor process, nearest first (Linux /proc)."""
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        fields = stat.rsplit(")", 1)[1].split()
        yield pid, [part.decode(errors="replace") for part in argv if part], fields[19]
        pid = int(fields[1])


def pipeline_execution_key() -> str | None:
    """An id for the `dvc` process running this stage, shared by every stage it runs."""
    for pid, argv, started in _process_ancestors():
        if any(Path(arg).name == "dvc" or arg.endswith("/dvc") for arg in argv[:2]):
            return f"{socket.gethostname()}:{pid}:{started}"
    return None


def _parent_run_id(experiment_id: str, tags: dict[str, str]) -> str | None:
    from mlflow import MlflowClient

    key = pipeline_execution_key()
    if key is None:
        return None
    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    name = os.environ.get("DVC_EXP_NAME") or time.strftime("pipeline %Y-%m-%d %H:%M:%S")
    shared = {k: v for k, v in tags.items() if k != "stage" and not k.startswith("upstream.")}
    # RUNNING until a stage ends it: a pipeline cut short (a killed stage or server) is never shown FINISHED
    parent = client.create_run(experiment_id, run_name=name, tags=shared | {PIPELINE_TAG: key, "stage": "pipeline"})
    return parent.info.run_id


def _end_parent(parent: str | None, status: str) -> None:
    """End the parent run with this stage: it then spans the pipeline so far, and shows a failed stage."""
    if parent:
        from mlflow import MlflowClient

        MlflowClient().set_terminated(parent, status=status)


# ---------------------------------------------------------------------------------- runs
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
    return {key: float(value) for key, value in flatten(metrics, prefix).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


@contextmanager
def stage_run(stage: str, params: Params, sections: list[str], upstream: list[str] = ()):
    """An MLflow run for one stage: tagged, params logged, grouped, lineage written at the end."""
    import mlflow

    experiment_id = configure(params)
    tags = run_tags(stage, params) | upstream_tags(list(upstream))
    parent = _parent_run_id(experiment_id, tags)
    if parent:
        tags["mlflow.parentRunId"] = parent
    try:
        with mlflow.start_run(run_name=stage, tags=tags) as run:
            mlflow.log_params(flatten({name: params.section(name) for name in sections}))
            yield run
    except BaseException:
        _end_parent(parent, "FAILED")
        raise
    _end_parent(parent, "FINISHED")
    LINEAGE_DIR.mkdir(parents=True, exist_ok=True)
    lineage = {"stage": stage, "run_id": run.info.run_id, "experiment_id": experiment_id, "parent_run_id": parent}
    (LINEAGE_DIR / f"{stage}.json").write_text(json.dumps(lineage, indent=2) + "\n")
    log.info("%s: MLflow run %s in %s", stage, run.info.run_id, tracking_uri())


def write_metrics(path: str | Path, metrics: dict, log_to_mlflow: bool = True) -> None:
    """Write a DVC metrics JSON and mirror its numeric leaves into the active MLflow run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if log_to_mlflow:
        import mlflow

        mlflow.log_metrics(numeric_leaves(metrics))
