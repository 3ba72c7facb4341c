"""The model card: one typed schema for what a model folder holds, written and read in one place."""

from __future__ import annotations

import json

import pytest
import torch

from stages.lib.core.errors import PipelineError
from stages.lib.model.card import CARD_VERSION, BaselineCard, FinetunedCard, FusionSpec, build_model
from stages.lib.model.fusion import FusedClassifier

DATA = {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "crop": "center"}


def card(**overrides) -> FinetunedCard:
    values = {
        "model": "test_efficientnet",
        "num_classes": 3,
        "classes": ["a", "b", "c"],
        "data_config": DATA,
        "temperature": 0.5,
        "classifier": "classifier",
        "kept_epoch": 2,
    } | overrides
    return FinetunedCard(**values)


def test_a_card_round_trips_with_its_version(tmp_path):
    written = card(fusion=FusionSpec(mode="gated", stages=2, dim=8)).write(tmp_path)
    stored = json.loads(written.read_text())
    assert written.name == "config.json" and stored["card_version"] == CARD_VERSION
    assert list(stored)[:4] == ["model", "num_classes", "classes", "data_config"]
    assert FinetunedCard.read(tmp_path) == card(fusion=FusionSpec(mode="gated", stages=2, dim=8))
    assert FinetunedCard.read(tmp_path).preprocessing.size == 32


def test_a_card_written_before_versions_reads_as_version_1(tmp_path):
    stored = card().model_dump(exclude_none=True)
    del stored["card_version"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert FinetunedCard.read(tmp_path).card_version == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda values: values.pop("classes"), "classes: Field required"),
        (lambda values: values.update(num_classes="three"), "num_classes"),
        (lambda values: values.update(surprise=1), "surprise: Extra inputs are not permitted"),
        (lambda values: values.update(card_version=CARD_VERSION + 1), "is newer than this code reads"),
        (lambda values: values.update(card_version="two"), "card_version: Input should be a valid integer"),
    ],
)
def test_a_bad_card_names_the_file_and_the_key(tmp_path, change, message):
    values = card().model_dump(exclude_none=True)
    change(values)
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(PipelineError, match=message) as error:
        FinetunedCard.read(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)


def test_a_missing_card_says_what_was_expected(tmp_path):
    with pytest.raises(PipelineError, match="config.json: not found"):
        BaselineCard.read(tmp_path)


def test_a_baseline_card_under_its_former_name_is_read(tmp_path, caplog):
    """Baseline folders written before the card was renamed (probe.json) still read, with a note."""
    values = {
        "model": "test_efficientnet", "weights": "none", "classes": ["a", "b"], "embedding_dim": 8,
        "classifier_dim": 8, "fusion_stages": 0, "C": 1.0, "grid": [], "classifier_C": 1.0,
        "features": "data/features/test_efficientnet.npz", "data_config": {},
    }  # fmt: skip
    (tmp_path / "probe.json").write_text(json.dumps(values))
    with caplog.at_level("INFO"):
        assert BaselineCard.read(tmp_path).model == "test_efficientnet"
    assert "former name" in caplog.text
    (tmp_path / "config.json").write_text(json.dumps(values | {"model": "newer"}))
    assert BaselineCard.read(tmp_path).model == "newer"


def test_build_model_makes_the_cards_network_and_its_weights_load(tmp_path):
    plain = card().build_model()
    assert plain.get_classifier().out_features == 3
    fused = card(fusion=FusionSpec(mode="concat", stages=2, dim=8)).build_model()
    assert isinstance(fused, FusedClassifier) and fused.head.fc.out_features == 3
    again = build_model("test_efficientnet", 3, fusion=FusionSpec(mode="concat", stages=2, dim=8))
    again.load_state_dict(fused.state_dict())
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(fused.eval()(images), again.eval()(images))
