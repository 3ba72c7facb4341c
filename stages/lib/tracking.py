"""MLflow tracking shared by every stage: where runs go, how they are tagged, grouped and linked.

- Store: `MLFLOW_TRACKING_URI` when set (a team server), else `sqlite:///<root>/mlflow.db`
  with artifacts under `<root>/mlartifacts/`. The root is `DVC_ROOT` (the real repository,
  also under `dvc exp run --temp/--queue`, which work in a temporary copy), else the git root.
- Tags on every run: stage, git commit and dirty flag, data version (md5 of the DVC-tracked
  image folder), DVC experiment name.
- One execution, one parent: the stage runs of one `dvc repro` / `dvc exp run` are children of
  a parent run named after the DVC experiment (or `repro <commit> <time>`), which holds every
  params section, the headline numbers of every metrics file, and `stage.<name>` tags naming the
  run behind each stage's outputs, also for stages DVC reused rather than re-ran. The parent is
  RUNNING while a stage runs and ends with the latest stage's status.
- Linking without ids in DVC outs: each stage run is tagged with a digest of the outputs it wrote
  (`outputs.digest`, over its `outs` in dvc.yaml). A stage finds the runs behind its inputs by the
  same digest of the files it reads, so links survive `dvc exp --temp`, the run cache and
  `dvc pull`, and the outputs themselves stay free of run ids.
"""

from __future__ import annotations

import functools
import hashlib
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

PIPELINE_TAG = "pipeline.execution"
OUTPUTS_TAG = "outputs.digest"
PIPELINE_FILE = Path("dvc.yaml")  # DVC's own pipeline file, in the working copy the stage runs in
# the params sections a parent run shows: everything that defines an execution
PARENT_SECTIONS = ("base", "data", "validate", "split", "model", "augment", "features", "finetune", "evaluate", "export")
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
            "Ask the server's admin to make you a writer (EDIT on it, MANAGE on the registered model)."
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
    local = uri.startswith("sqlite:") or uri.startswith("file:")
    if experiment is None:
        location = (root / "mlartifacts" / name).as_uri() if local else None
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    if local:
        _hide_unused_default_experiment()
    if experiment is None or experiment.tags.get("mlflow.experimentKind") != "custom_model_development":
        # open on the runs table, not MLflow 3's GenAI traces view
        mlflow.MlflowClient().set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _hide_unused_default_experiment() -> None:
    """A new local store comes with an empty "Default" experiment pointing at ./mlruns/0: deleted (hidden in
    the UI) while it holds no run, so the UI lists the pipeline's experiment alone."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        default = client.get_experiment("0")
        if default.lifecycle_stage == "active" and not client.search_runs(["0"], max_results=1):
            client.delete_experiment("0")
    except MlflowException:
        pass


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


def execution_name(tags: dict[str, str]) -> str:
    """The parent run's name: the DVC experiment's, else `repro <commit> <local time>`."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    return f"repro {tags.get('git.commit', 'unknown')[:7]} {time.strftime('%Y-%m-%d %H:%M')}"


def _parent_run(experiment_id: str, tags: dict[str, str], params: Params) -> str | None:
    """The run id of this execution's parent: found (and marked RUNNING again) or created with the params."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    key = pipeline_execution_key()
    if key is None:
        return None
    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    shared = {k: v for k, v in tags.items() if k != "stage" and not k.startswith("upstream.")}
    parent = client.create_run(experiment_id, run_name=execution_name(tags),
                               tags=shared | {PIPELINE_TAG: key, "stage": "pipeline"})
    flat = flatten({name: params.section(name) for name in PARENT_SECTIONS})
    client.log_batch(parent.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
    return parent.info.run_id


def _end_parent(parent: str | None, experiment_id: str, status: str) -> None:
    """Record on the parent the run behind every stage's current outputs (re-run or reused) and every
    metrics file's headline numbers, and end it with this stage: it spans the pipeline so far and
    shows a failed stage."""
    if not parent:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in pipeline_metrics().items()]
    tags = [RunTag(f"stage.{name}", run_id) for name in pipeline_stages()
            if (run_id := producing_run(experiment_id, name)) is not None]
    client.log_batch(parent, metrics=metrics, tags=tags)
    client.set_terminated(parent, status=status)


# ---------------------------------------------------------------------- stages and outputs
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


def upstream_stages(stage: str) -> list[str]:
    """The stages whose outs this stage depends on (from dvc.yaml)."""
    stages = pipeline_stages()
    deps = set(_paths(stages.get(stage, {}).get("deps")))
    return [name for name, spec in stages.items() if name != stage and deps & set(_paths(spec.get("outs")))]


def outputs_digest(paths: list[str]) -> str | None:
    """sha256 over the files under `paths` (names and bytes, in sorted order); None when one is missing."""
    digest = hashlib.sha256()
    for path in map(Path, sorted(paths)):
        if not path.exists():
            return None
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.name == ".gitignore":
                continue
            digest.update(file.as_posix().encode() + b"\0")
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def producing_run(experiment_id: str, stage: str) -> str | None:
    """The latest finished run of `stage` whose outputs are the files in the working copy now."""
    from mlflow import MlflowClient

    digest = outputs_digest(stage_outputs(stage))
    if digest is None:
        return None
    found = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.stage = '{stage}' and tags.`{OUTPUTS_TAG}` = '{digest}' "
                                       "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


def pipeline_metrics() -> dict[str, float]:
    """Every metrics file of dvc.yaml, flattened as `<file stem>.<key>`: the execution's headline numbers."""
    numbers = {}
    for spec in pipeline_stages().values():
        for path in map(Path, _paths(spec.get("metrics"))):
            if path.is_file():
                numbers |= numeric_leaves(json.loads(path.read_text()), path.stem)
    return numbers


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
def stage_run(stage: str, params: Params, sections: list[str]):
    """An MLflow run for one stage: tagged, its params sections logged, grouped under the execution's
    parent, linked to the runs behind its inputs; tagged at the end with the digest of its outputs."""
    import mlflow

    experiment_id = configure(params)
    tags = run_tags(stage, params)
    links = {name: run_id for name in upstream_stages(stage)
             if (run_id := producing_run(experiment_id, name)) is not None}
    tags |= {f"upstream.{name}": run_id for name, run_id in links.items()}
    parent = _parent_run(experiment_id, tags, params)
    if parent:
        tags["mlflow.parentRunId"] = parent
    try:
        with mlflow.start_run(run_name=stage, tags=tags) as run:
            mlflow.log_params(flatten({name: params.section(name) for name in sections}))
            yield run
            digest = outputs_digest(stage_outputs(stage))
            if digest:
                mlflow.set_tag(OUTPUTS_TAG, digest)
    except BaseException:
        _end_parent(parent, experiment_id, "FAILED")
        raise
    _end_parent(parent, experiment_id, "FINISHED")
    log.info("%s: MLflow run %s in %s", stage, run.info.run_id, tracking_uri())


def write_metrics(path: str | Path, metrics: dict, log_to_mlflow: bool = True) -> None:
    """Write a DVC metrics JSON and mirror its numeric leaves into the active MLflow run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if log_to_mlflow:
        import mlflow

        mlflow.log_metrics(numeric_leaves(metrics))
