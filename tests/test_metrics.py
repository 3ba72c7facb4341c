"""Evaluation metrics on a case small enough to check by hand, and the report files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from stages.lib.evaluation.figures import error_gallery, reliability_figure
from stages.lib.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
    per_class_table,
    top_k_accuracy,
)

# 4 test images, 3 classes. Predictions: 0 (right, p=.7), 0 (wrong, true 1 is 2nd), 2 (right, p=.5),
# 1 (wrong, true 2 is 2nd).
LABELS = np.array([0, 1, 2, 2])
PROBABILITIES = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.5, 0.4, 0.1],
        [0.2, 0.3, 0.5],
        [0.1, 0.6, 0.3],
    ]
)


def test_metrics_match_the_hand_computed_values():
    metrics = classification_metrics(LABELS, PROBABILITIES, top_k=2)
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    # recall per class: 1/1, 0/1, 1/2; precision per predicted class: 1/2, 0/1, 1/1
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert metrics["macro_recall"] == pytest.approx(0.5)
    assert metrics["macro_precision"] == pytest.approx((0.5 + 0 + 1) / 3)
    # F1 per class: 2/3, 0, 2/3
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    # every true class is among the two most probable
    assert metrics["top_k_accuracy"] == pytest.approx(1.0)
    assert metrics["log_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.5) + math.log(0.3)) / 4)
    # bins: (.4,.5] holds p=.5 right and p=.5 wrong (gap 0); (.5,.6] p=.6 wrong (gap .6); (.6,.7] p=.7 right (gap .3)
    assert metrics["ece"] == pytest.approx(0.25 * 0.6 + 0.25 * 0.3)


def test_top_k_accuracy_counts_the_true_class_among_the_k_most_probable():
    assert top_k_accuracy(LABELS, PROBABILITIES, 1) == pytest.approx(0.5)
    assert top_k_accuracy(LABELS, PROBABILITIES, 2) == pytest.approx(1.0)
    assert top_k_accuracy(LABELS, PROBABILITIES, 10) == pytest.approx(1.0)  # k above the class count is capped
    binary = np.array([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    assert top_k_accuracy(np.array([0, 1, 1]), binary, 1) == pytest.approx(2 / 3)


def test_reliability_bins_hold_accuracy_confidence_and_count():
    ece, rows = expected_calibration_error(PROBABILITIES, LABELS)
    assert [(row["confidence"], row["accuracy"], row["count"]) for row in rows] == [
        (0.5, 0.5, 2),
        (0.6, 0.0, 1),
        (0.7, 1.0, 1),
    ]
    assert ece == pytest.approx(0.225)
    perfect = np.eye(3)[[0, 1, 2]]
    assert expected_calibration_error(perfect, np.array([0, 1, 2]))[0] == pytest.approx(0.0)


def test_per_class_table_puts_models_side_by_side():
    table = per_class_table(LABELS, {"baseline": PROBABILITIES.argmax(1), "finetuned": LABELS}, ["a", "b", "c"])
    assert list(table["class"]) == ["a", "b", "c"]
    assert list(table["support"]) == [1, 1, 2]
    assert list(table["baseline_recall"]) == pytest.approx([1.0, 0.0, 0.5])
    assert list(table["baseline_precision"]) == pytest.approx([0.5, 0.0, 1.0])
    assert list(table["baseline_f1"]) == pytest.approx([2 / 3, 0.0, 2 / 3])
    assert list(table["finetuned_f1"]) == pytest.approx([1.0, 1.0, 1.0])


def test_error_gallery_shows_the_wrong_images_and_the_reliability_figure_is_drawn(tmp_path):
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    assert error_gallery(images, LABELS, PROBABILITIES, ["a", "b", "c"], 16, tmp_path / "gallery.png") == 2
    assert error_gallery(images, LABELS, PROBABILITIES, ["a", "b", "c"], 1, tmp_path / "one.png") == 1
    reliability_figure({"model": expected_calibration_error(PROBABILITIES, LABELS)}, tmp_path / "rel.png")
    for name in ("gallery.png", "one.png", "rel.png"):
        assert Image.open(tmp_path / name).size[0] > 100
