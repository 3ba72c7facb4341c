"""What a sweep refuses before anything is submitted, each as one line (TeamError) naming what to set.

On a cluster (`check_prerequisites`): no git remote `origin`; no default DVC remote in the committed
.dvc/config; no tracking server (MLFLOW_TRACKING_URI unset, SQLite or a local folder, or not answering);
uncommitted changes; the commit not on `origin`. The resources a trial asks are checked against the
cluster's nodes by the driver (team.driver.connect).

On one machine (`check_workspace`, `check_machine`): uncommitted changes; a tracking URI that is neither
the workspace's SQLite store nor a server; more CPUs or GPUs than the machine has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from team import TeamError

REPORTS = Path("reports/sweeps")
OWN_OUTPUTS = (str(REPORTS) + "/",)  # the sweep's own reports do not count as uncommitted changes


@dataclass
class Prerequisites:
    """What a sweep needs from the workspace, found by `check_prerequisites`."""

    remote: str
    commit: str
    tracking_uri: str
    experiment: str = "transfer-learning"


def _git(repo: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=timeout)


def dvc_binary() -> str:
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.exists() else "dvc"


def check_tracking_uri(uri: str | None, timeout_s: float = 10.0) -> str:
    """The tracking server's URI, or TeamError: unset, SQLite, a local folder, or no answer."""
    if not uri:
        raise TeamError(
            "MLFLOW_TRACKING_URI is not set: a sweep logs to the team tracking server "
            "(make server, then export MLFLOW_TRACKING_URI=http://...)"
        )
    scheme = urlparse(uri).scheme
    if scheme in ("", "file", "sqlite") or (len(scheme) == 1 and uri[1:3] == ":\\"):
        raise TeamError(
            f"MLFLOW_TRACKING_URI={uri} is a local store: trials on other nodes cannot share it (SQLite has "
            "one writer, a scratch clone's store is deleted); set it to the team server (make server)"
        )
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise OSError(f"status {response.status}")
        except (OSError, urllib.error.URLError) as error:
            raise TeamError(
                f"the tracking server {uri} does not answer ({error}): start it (make server) "
                "or fix MLFLOW_TRACKING_URI"
            ) from None
    return uri


def check_prerequisites(repo: Path, env: dict | None = None) -> Prerequisites:
    """Check the workspace before anything is submitted; TeamError names what to set."""
    env = os.environ if env is None else env
    remote = _git(repo, "remote", "get-url", "origin")
    if remote.returncode != 0:
        raise TeamError("no git remote 'origin': trials clone it (git remote add origin URL && git push origin HEAD)")
    remote_url = remote.stdout.strip()
    if not Path(remote_url).is_absolute() and "://" not in remote_url and ":" not in remote_url:
        remote_url = str((repo / remote_url).resolve())  # a relative path means nothing on another node
    default = subprocess.run(
        [dvc_binary(), "config", "--project", "core.remote"], cwd=repo, capture_output=True, text=True
    )
    if default.returncode != 0 or not default.stdout.strip():
        raise TeamError(
            "no default DVC remote in the committed .dvc/config: trials pull and push through it "
            "(dvc remote add -d NAME URL, commit .dvc/config; not --local: clones do not see it)"
        )
    tracking = check_tracking_uri(env.get("MLFLOW_TRACKING_URI"))
    commit = check_committed(repo)
    fetched = _git(repo, "fetch", "-q", "origin")
    if fetched.returncode != 0:
        raise TeamError(
            f"git fetch origin failed: {fetched.stderr.strip().splitlines()[-1] if fetched.stderr.strip() else '?'}"
        )
    if not _git(repo, "branch", "-r", "--contains", commit).stdout.strip():
        raise TeamError(f"commit {commit[:7]} is not on origin: push it first (git push origin HEAD)")
    return Prerequisites(remote_url, commit, tracking, experiment_name(repo))


def check_committed(repo: Path) -> str:
    """The commit trials run; TeamError when the workspace has changes that are not in it."""
    status = _git(repo, "status", "--porcelain", "--untracked-files=all")
    changes = [line for line in status.stdout.splitlines() if not line[3:].startswith(OWN_OUTPUTS)]
    if status.returncode != 0 or changes:
        raise TeamError(
            f"uncommitted changes ({len(changes)} paths, e.g. {changes[0][3:] if changes else '?'}): "
            "trials run the commit, not the workspace; commit (and push) or stash them first"
        )
    return _git(repo, "rev-parse", "HEAD").stdout.strip()


def experiment_name(repo: Path) -> str:
    """The MLflow experiment the pipeline logs to (params.yaml's mlflow.experiment)."""
    experiment = "transfer-learning"
    try:
        import yaml

        experiment = yaml.safe_load((repo / "params.yaml").read_text())["mlflow"]["experiment"] or experiment
    except (OSError, KeyError, TypeError):
        pass
    return experiment


def has_origin(repo: Path) -> bool:
    return _git(repo, "remote", "get-url", "origin").returncode == 0


def check_workspace(repo: Path, env: dict | None = None) -> tuple[Prerequisites, Path | None]:
    """One machine: trials clone this workspace and share its DVC cache, nothing else to set up.
    Returns the prerequisites (the remote is the workspace itself) and the SQLite store to serve to the
    trials (None when MLFLOW_TRACKING_URI names a server, which they then use)."""
    env = os.environ if env is None else env
    uri = env.get("MLFLOW_TRACKING_URI") or ""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        store, tracking = None, check_tracking_uri(uri)
    elif not uri or scheme == "sqlite":
        store = Path(uri[len("sqlite:///") :]) if uri else repo / "mlflow.db"
        store = store if store.is_absolute() else repo / store
        tracking = "(a private server of the sweep)"
    else:
        raise TeamError(
            f"MLFLOW_TRACKING_URI={uri}: a sweep on one machine logs to the workspace's SQLite store "
            "(unset the variable) or a tracking server (http://...)"
        )
    commit = check_committed(repo)
    top = _git(repo, "rev-parse", "--show-toplevel").stdout.strip()
    return Prerequisites(top or str(repo.resolve()), commit, tracking, experiment_name(repo)), store


def cache_dir(repo: Path) -> str:
    """The workspace's DVC cache folder (absolute): trials on this machine share it."""
    shown = subprocess.run([dvc_binary(), "cache", "dir"], cwd=repo, capture_output=True, text=True)
    if shown.returncode != 0 or not shown.stdout.strip():
        raise TeamError(f"dvc cache dir failed in {repo}: {(shown.stderr or shown.stdout).strip()[-200:]}")
    return str((repo / shown.stdout.strip()).resolve())


def check_machine(cpus: float, gpus: float, cores: int, devices: int) -> None:
    """Refuse a trial that asks more CPUs or GPUs than this machine has (it would wait for ever)."""
    if gpus > devices:
        raise TeamError(f"a trial asks {gpus:g} GPUs but this machine has {devices}: lower --gpus")
    if gpus > 1 and gpus != int(gpus):
        raise TeamError(f"--gpus {gpus:g}: a fraction of one GPU, or whole GPUs")
    if cpus > cores:
        raise TeamError(f"a trial asks {cpus:g} CPUs but this machine has {cores}: lower --cpus")
