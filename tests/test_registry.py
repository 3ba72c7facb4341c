"""Alias rules of the model registry, on a real (temporary SQLite) MLflow store."""

from __future__ import annotations

import itertools
import random

import pytest

from stages.lib.registry.aliases import Evaluated, choose_aliases, own_evaluation, record_evaluation, settle_aliases

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


def evaluate(
    client, name: str, version: str, accuracy: float, val_images: str = "digest-1", min_improvement: float = 0.0
) -> dict:
    if own_evaluation(client, name, version):
        record_evaluation(
            client,
            name,
            version,
            {
                "evaluation.run_id": f"run-{version}",
                "val.accuracy": str(accuracy),
                "val.images": val_images,
                "test.accuracy": "0.5",
            },
            "described",
        )
    return settle_aliases(client, name, "accuracy", min_improvement, pause_s=0.0)


def test_first_version_is_champion_and_not_also_challenger(client, model):
    name, new_version = model
    version = new_version()
    assert evaluate(client, name, version, 0.90) == {"champion": version, "challenger": None}
    assert aliases(client, name) == {"champion": version}
    tags = client.get_model_version(name, version).tags
    assert tags["val.accuracy"] == "0.9" and tags["test.accuracy"] == "0.5"


def test_better_on_val_takes_over_and_worse_is_challenger(client, model):
    name, new_version = model
    first, second, third = new_version(), new_version(), new_version()
    evaluate(client, name, first, 0.90)
    assert evaluate(client, name, second, 0.95) == {"champion": second, "challenger": None}
    assert evaluate(client, name, third, 0.93) == {"champion": second, "challenger": third}
    assert aliases(client, name) == {"champion": second, "challenger": third}


def test_a_tie_or_a_gain_within_the_margin_keeps_the_earlier_version(client, model):
    name, new_version = model
    first, second, third = new_version(), new_version(), new_version()
    evaluate(client, name, first, 0.90, min_improvement=0.02)
    assert evaluate(client, name, second, 0.91, min_improvement=0.02)["champion"] == first
    assert evaluate(client, name, third, 0.93, min_improvement=0.02)["champion"] == third


def test_a_version_is_described_by_its_own_evaluation_only(client, model):
    """A later evaluation of the same version (another experiment reusing the trained model) leaves its tags."""
    name, new_version = model
    version = new_version()
    evaluate(client, name, version, 0.90)
    assert not own_evaluation(client, name, version)
    evaluate(client, name, version, 0.10)
    assert client.get_model_version(name, version).tags["val.accuracy"] == "0.9"
    assert aliases(client, name) == {"champion": version}


def test_versions_on_other_val_images_are_not_compared(client, model):
    """After the data changed, the champion is chosen among versions evaluated on the new val images."""
    name, new_version = model
    old, new = new_version(), new_version()
    evaluate(client, name, old, 0.99, val_images="old-data")
    assert evaluate(client, name, new, 0.80, val_images="new-data") == {"champion": new, "challenger": None}


def test_the_outcome_does_not_depend_on_the_order_of_evaluations():
    scores = [0.90, 0.95, 0.93, 0.95, 0.91]
    evaluated = [Evaluated(i + 1, score, "d") for i, score in enumerate(scores)]
    expected = choose_aliases(evaluated, 0.0)
    assert expected == (2, 5)  # best val (ties: the earlier), then the newest other version
    for _ in range(20):
        random.shuffle(evaluated)
        assert choose_aliases(evaluated, 0.0) == expected
