"""Where MLflow runs go: `MLFLOW_TRACKING_URI` when set (a team server), else
`sqlite:///<root>/mlflow.db` with artifacts under `<root>/mlartifacts/`. The root is `DVC_ROOT` (the real
repository, also under `dvc exp run --temp/--queue`, which work in a temporary copy), else the git root.
An unreachable server, or one that refuses the credentials, fails the stage before any work."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from stages.lib.core.errors import PipelineError
from stages.lib.core.params import Params


def git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


class TrackingError(PipelineError, RuntimeError):
    """The MLflow store cannot be reached or used."""


def repo_root() -> Path:
    """The real repository root: DVC_ROOT under DVC, else the git top level, else the cwd."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    top = git("rev-parse", "--show-toplevel")
    return Path(top).resolve() if top else Path.cwd().resolve()


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def check_reachable(uri: str, experiment: str | None = None, timeout_s: float = 10.0) -> None:
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
        response = http_request(
            creds,
            "/api/2.0/mlflow/experiments/get-by-name",
            "GET",
            max_retries=0,
            timeout=timeout_s,
            params={"experiment_name": experiment or "Default"},
        )
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
    check_reachable(uri, params.mlflow.experiment)
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
