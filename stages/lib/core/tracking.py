"""A stage's MLflow run: how it is tagged, grouped and linked (where it goes: store.py).

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
- Nothing stays RUNNING for ever: each stage run is tagged with its process (`process`); the next stage
  that starts on the same machine marks KILLED the runs whose process has ended without closing them
  (`close_abandoned_runs`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from stages.lib.core.digest import paths_sha256
from stages.lib.core.metrics_io import flatten, pipeline_metrics
from stages.lib.core.params import Params
from stages.lib.core.pipeline import pipeline_params, pipeline_stages, stage_outputs, stage_params, upstream_stages
from stages.lib.core.store import configure, git, tracking_uri

log = logging.getLogger(__name__)

PIPELINE_TAG = "pipeline.execution"
PROCESS_TAG = "process"  # host:pid:start time of the stage process that owns a run
OUTPUTS_TAG = "outputs.digest"
PIPELINE_WRITES = ("dvc.lock", "metrics", "plots", "**/.gitignore")  # git-tracked files that stages rewrite


# ------------------------------------------------------------------------------------ tags
def data_version(images_dir: str) -> str:
    """The md5 DVC recorded for the image folder (`<images_dir>.dvc`), or 'untracked'."""
    dvc_file = Path(images_dir.rstrip("/") + ".dvc")
    try:
        outs = yaml.safe_load(dvc_file.read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "untracked"


def run_tags(stage: str, params: Params) -> dict[str, str]:
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git("rev-parse", "HEAD") or "unknown"
    # what the pipeline itself rewrites (dvc.lock, metrics, plots) does not make the code dirty
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", *[f":!{path}" for path in PIPELINE_WRITES])
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
def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (Linux); None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_key(pid: int | None = None) -> str | None:
    """`host:pid:start time` of a process (this one by default): an id that a later process with the same
    pid does not share. None when there is no such process."""
    pid = pid or os.getpid()
    fields = _stat(pid)
    return f"{socket.gethostname()}:{pid}:{fields[19]}" if fields else None


def _process_ancestors() -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of each ancestor process, nearest first (Linux /proc)."""
    pid = os.getppid()
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        fields = _stat(pid)
        if fields is None:
            return
        yield pid, [part.decode(errors="replace") for part in argv if part]
        pid = int(fields[1])


def pipeline_execution_key() -> str | None:
    """An id for the `dvc` process running this stage, shared by every stage it runs."""
    for pid, argv in _process_ancestors():
        if any(Path(arg).name == "dvc" or arg.endswith("/dvc") for arg in argv[:2]):
            return process_key(pid)
    return None


def _gone(key: str) -> bool:
    """Whether the process `key` (process_key's form) is known to have ended: only this machine's can be."""
    host, _, rest = key.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and process_key(int(pid)) != key


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by a process of this machine that has ended without closing them (a
    stage or a `dvc` process killed mid-run): a stage run by its `process` tag, a parent by its execution
    key. Runs of live processes, and of other machines, are left alone. Returns the ids marked."""
    from mlflow import MlflowClient

    client = MlflowClient()
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500)
    closed = []
    for run in running:
        owner = run.data.tags.get(PROCESS_TAG) or run.data.tags.get(PIPELINE_TAG)
        if owner and _gone(owner):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
            log.warning(
                "run %s (%s) was left RUNNING by %s, which has ended: marked KILLED",
                run.info.run_id,
                run.data.tags.get("stage", "?"),
                owner,
            )
    return closed


def execution_name(tags: dict[str, str]) -> str:
    """The parent run's name: the DVC experiment's, else `repro <commit> <local time>`."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    return f"repro {tags.get('git.commit', 'unknown')[:7]} {time.strftime('%Y-%m-%d %H:%M')}"


def _parent_run(experiment_id: str, tags: dict[str, str], params: Params) -> str | None:
    """The run id of this execution's parent: found (and marked RUNNING again) or created with the params."""
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from mlflow.tracking.context.registry import resolve_tags

    key = pipeline_execution_key()
    if key is None:
        return None
    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    shared = {k: v for k, v in tags.items() if k not in ("stage", PROCESS_TAG) and not k.startswith("upstream.")}
    # MLflow's run context (user, source, MLFLOW_RUN_CONTEXT's tags: a sweep's name) as on a fluent run
    parent = client.create_run(
        experiment_id,
        run_name=execution_name(tags),
        tags=resolve_tags(shared | {PIPELINE_TAG: key, "stage": "pipeline"}),
    )
    flat = flatten(params.subset(pipeline_params()))  # everything that defines an execution
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
    tags = [
        RunTag(f"stage.{name}", run_id)
        for name in pipeline_stages()
        if (run_id := producing_run(experiment_id, name)) is not None
    ]
    client.log_batch(parent, metrics=metrics, tags=tags)
    client.set_terminated(parent, status=status)


def producing_run(experiment_id: str, stage: str) -> str | None:
    """The latest finished run of `stage` whose outputs are the files in the working copy now."""
    from mlflow import MlflowClient

    digest = paths_sha256(stage_outputs(stage))
    if digest is None:
        return None
    found = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.stage = '{stage}' and tags.`{OUTPUTS_TAG}` = '{digest}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


# ---------------------------------------------------------------------------------- runs
@contextmanager
def stage_run(stage: str, params: Params):
    """An MLflow run for one stage: tagged, the params it declares in dvc.yaml logged, grouped under the
    execution's parent, linked to the runs behind its inputs; tagged at the end with the digest of its outputs."""
    import mlflow

    experiment_id = configure(params)
    close_abandoned_runs(experiment_id)
    tags = run_tags(stage, params) | {PROCESS_TAG: process_key()}
    links = {
        name: run_id for name in upstream_stages(stage) if (run_id := producing_run(experiment_id, name)) is not None
    }
    tags |= {f"upstream.{name}": run_id for name, run_id in links.items()}
    parent = _parent_run(experiment_id, tags, params)
    if parent:
        tags["mlflow.parentRunId"] = parent
    try:
        with mlflow.start_run(run_name=stage, tags=tags) as run:
            mlflow.log_params(flatten(params.subset(stage_params(stage))))
            yield run
            digest = paths_sha256(stage_outputs(stage))
            if digest:
                mlflow.set_tag(OUTPUTS_TAG, digest)
    except BaseException:
        _end_parent(parent, experiment_id, "FAILED")
        raise
    _end_parent(parent, experiment_id, "FINISHED")
    log.info("%s: MLflow run %s in %s", stage, run.info.run_id, tracking_uri())


def log_epoch(row: dict) -> None:
    """One epoch's history row as MLflow step metrics, grouped for the UI's charts: `train_loss` is logged as
    `train/loss`, `val_accuracy` as `val/accuracy`, `lr_head` as `lr/head` (the phase is a tag of the run,
    its boundaries are in the history)."""
    import mlflow

    metrics = {}
    for key, value in row.items():
        if key in ("epoch", "phase", "phase_index"):
            continue
        group, _, name = key.partition("_")
        metrics[f"{group}/{name}"] = value
    mlflow.log_metrics(metrics, step=row["epoch"])
