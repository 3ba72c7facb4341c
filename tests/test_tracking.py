"""Where MLflow runs go, and what fails fast."""

import socket

import pytest

from stages.lib.core.metrics_io import flatten
from stages.lib.core.params import parse_params
from stages.lib.core.store import TrackingError, configure, repo_root, tracking_uri
from stages.lib.core.tracking import data_version


def test_store_is_under_the_real_repository_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert repo_root() == tmp_path.resolve()
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri() == "http://mlflow.example:5000"


def test_unreachable_tracking_server_fails_fast(monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(TrackingError, match=f"http://127.0.0.1:{port} is unreachable"):
        configure(parse_params({"finetune": {"phases": [{"name": "a", "epochs": 1, "lr": 0.1}]}}))


def test_data_version_is_the_dvc_md5(tmp_path):
    (tmp_path / "images.dvc").write_text("outs:\n- md5: abc123.dir\n  path: images\n")
    assert data_version(str(tmp_path / "images")) == "abc123.dir"
    assert data_version(str(tmp_path / "other")) == "untracked"


def test_flatten_names_nested_params_like_dvc():
    flat = flatten({"finetune": {"phases": [{"lr": 0.1}, {"lr": 0.01}], "scale": [0.9, 1.1]}})
    assert flat == {"finetune.phases.0.lr": 0.1, "finetune.phases.1.lr": 0.01, "finetune.scale": [0.9, 1.1]}


def test_the_parent_run_spans_its_stages_and_shows_a_failed_one(monkeypatch, tmp_path):
    """Stages of one dvc process share a parent run, which ends with the latest stage and its status."""
    import mlflow
    from mlflow import MlflowClient

    from stages.lib.core import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "pipeline_execution_key", lambda: "host:123:456")
    params = parse_params({"finetune": {"phases": [{"name": "a", "epochs": 1, "lr": 0.1}]}})
    with tracking.stage_run("validate", params) as first:
        pass
    with pytest.raises(RuntimeError), tracking.stage_run("split", params) as second:
        raise RuntimeError("the split failed")
    client = MlflowClient()
    parent_id = client.get_run(first.info.run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(second.info.run_id).data.tags["mlflow.parentRunId"] == parent_id
    parent, failed = client.get_run(parent_id).info, client.get_run(second.info.run_id).info
    assert (parent.status, failed.status) == ("FAILED", "FAILED") and parent.end_time >= failed.end_time
    mlflow.set_tracking_uri(None)
