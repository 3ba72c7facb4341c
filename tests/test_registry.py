"""Alias rules of the model registry, on a real (temporary SQLite) MLflow store."""

from __future__ import annotations

import itertools

import pytest

from stages.lib.registry import record_evaluation, should_promote

_names = itertools.count()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import mlflow
    from mlflow import MlflowClient

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}")
    yield MlflowClient()
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def model(client, tmp_path):
    """A registered model name and a function that adds a version."""
    name = f"classifier-{next(_names)}"
    client.create_registered_model(name)
    return name, lambda: str(client.create_model_version(name, source=str(tmp_path)).version)


def aliases(client, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def evaluate(name: str, version: str, accuracy: float, min_improvement: float = 0.0) -> dict:
    return record_evaluation(name, version, {"accuracy": accuracy, "macro_f1": accuracy}, "accuracy", min_improvement)


def test_first_version_becomes_champion(client, model):
    name, new_version = model
    version = new_version()
    assert evaluate(name, version, 0.90)["champion"]
    assert aliases(client, name) == {"challenger": version, "champion": version}
    assert client.get_model_version(name, version).tags["test_accuracy"] == "0.900000"


def test_better_version_takes_over_and_worse_stays_challenger(client, model):
    name, new_version = model
    first, second, third = new_version(), new_version(), new_version()
    evaluate(name, first, 0.90)
    assert evaluate(name, second, 0.95)["champion"]
    assert aliases(client, name) == {"challenger": second, "champion": second}
    result = evaluate(name, third, 0.93)
    assert not result["champion"] and result["champion_version"] == second
    assert aliases(client, name) == {"challenger": third, "champion": second}


def test_a_tie_or_a_gain_within_the_margin_does_not_promote(client, model):
    name, new_version = model
    first, second, third = new_version(), new_version(), new_version()
    evaluate(name, first, 0.90, min_improvement=0.02)
    assert not evaluate(name, second, 0.91, min_improvement=0.02)["champion"]
    assert aliases(client, name)["champion"] == first
    assert evaluate(name, third, 0.93, min_improvement=0.02)["champion"]
    assert aliases(client, name)["champion"] == third


def test_re_evaluating_the_champion_keeps_it(client, model):
    name, new_version = model
    version = new_version()
    evaluate(name, version, 0.90)
    assert evaluate(name, version, 0.80)["champion"]
    assert aliases(client, name)["champion"] == version


def test_the_rule_on_its_own():
    assert should_promote(0.5, None, 0.1)
    assert should_promote(0.91, 0.90, 0.0)
    assert not should_promote(0.90, 0.90, 0.0)
    assert not should_promote(0.905, 0.90, 0.01)
