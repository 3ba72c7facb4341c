"""What a sweep refuses before anything is submitted, each as one line (TeamError) naming what to set.

On a cluster (`check_prerequisites`): no git remote `origin`; no default DVC remote in the committed
.dvc/config; no tracking server (MLFLOW_TRACKING_URI unset, SQLite or a local folder, or not answering);
uncommitted changes; the commit not on `origin`. The resources a trial asks are checked against the
cluster's nodes by the driver (team.driver.connect).
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
    status = _git(repo, "status", "--porcelain", "--untracked-files=all")
    changes = [line for line in status.stdout.splitlines() if not line[3:].startswith(OWN_OUTPUTS)]
    if status.returncode != 0 or changes:
        raise TeamError(
            f"uncommitted changes ({len(changes)} paths, e.g. {changes[0][3:] if changes else '?'}): "
            "trials run the commit, not the workspace; commit (and push) or stash them first"
        )
    commit = _git(repo, "rev-parse", "HEAD").stdout.strip()
    fetched = _git(repo, "fetch", "-q", "origin")
    if fetched.returncode != 0:
        raise TeamError(
            f"git fetch origin failed: {fetched.stderr.strip().splitlines()[-1] if fetched.stderr.strip() else '?'}"
        )
    if not _git(repo, "branch", "-r", "--contains", commit).stdout.strip():
        raise TeamError(f"commit {commit[:7]} is not on origin: push it first (git push origin HEAD)")
    experiment = "transfer-learning"
    try:
        import yaml

        experiment = yaml.safe_load((repo / "params.yaml").read_text())["mlflow"]["experiment"] or experiment
    except (OSError, KeyError, TypeError):
        pass
    return Prerequisites(remote_url, commit, tracking, experiment)
