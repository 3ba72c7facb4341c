"""A model that says when it doesn't know, and shows where it looked: the abstain rule (chosen on val, carried by
the model card, applied by predict, the registered pyfunc and the ONNX export folder alike), selective prediction
in evaluate, and Grad-CAM heatmaps whose peak must land on the evidence."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BIN, REPO, mlflow_runs, run

from stages.demo_data import SHAPES
from stages.lib.data.pixels import to_float_array
from stages.lib.model.abstention import (
    LOW_CONFIDENCE,
    UNKNOWN,
    AbstainSpec,
    Reference,
    choose_confidence_threshold,
    decide,
    risk_coverage,
)
from stages.lib.model.backbones import NormalizedClassifier, create_backbone
from stages.lib.model.card import FinetunedCard, FusionSpec, build_model
from stages.lib.model.gradcam import heatmaps, target_layer

MODEL_NAME = "image-classifier"


def spec(ood: float = 0.5, confidence: float = 0.6) -> AbstainSpec:
    return AbstainSpec(
        ood_threshold=ood,
        confidence_threshold=confidence,
        reference_sha256="-",
        reference_images=1,
        keep_in_set=0.95,
        target_accuracy=0.99,
        val_coverage=1.0,
        val_accepted_accuracy=1.0,
    )


def test_one_rule_gives_each_abstention_its_reason():
    probabilities = np.array([[0.9, 0.1], [0.55, 0.45], [0.99, 0.01], [0.5, 0.5]])
    decisions = decide(probabilities, np.array([0.1, 0.2, 0.9, 0.9]), spec())
    assert decisions.abstained.tolist() == [False, True, True, True]
    assert decisions.reason == ["", LOW_CONFIDENCE, UNKNOWN, UNKNOWN]  # unknown input is said first
    assert not decide(probabilities, np.ones(4), None).abstained.any()  # no rule: the bare answer


def test_ood_score_is_the_mahalanobis_distance_to_the_nearest_class_mean():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    embeddings = rng.normal(size=(120, 6)) * [1, 2, 3, 1, 1, 5] + labels[:, None] * 4.0
    reference = Reference.fit(embeddings, labels)
    means = np.stack([embeddings[labels == c].mean(0) for c in range(3)])
    precision = LedoitWolf().fit(embeddings - means[labels]).precision_
    queries = rng.normal(size=(5, 6)) * 6
    expected = [min((q - m) @ precision @ (q - m) for m in means) for q in queries]
    assert reference.scores(queries) == pytest.approx(expected, rel=1e-4)
    assert reference.scores(means).max() < 1e-3  # a class mean is in the set


def test_the_card_carries_the_rule_and_older_cards_read_as_before(tmp_path):
    values = {
        "model": "tf_efficientnet_lite0",
        "num_classes": 2,
        "classes": ["a", "b"],
        "data_config": {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert FinetunedCard.read(tmp_path).abstain is None  # a model from before the rule: it answers everything
    FinetunedCard.model_validate(values | {"abstain": spec().model_dump()}).write(tmp_path)
    assert FinetunedCard.read(tmp_path).abstain == spec()


def test_confidence_threshold_is_the_widest_that_reaches_the_target():
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, True, False, True, False])
    curve = risk_coverage(confidence, correct)
    assert curve.coverage.tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert choose_confidence_threshold(confidence, correct, 1.0) == 0.9
    assert choose_confidence_threshold(confidence, correct, 0.8) == 0.7  # 4 of 5 accepted are right
    assert choose_confidence_threshold(confidence, correct, 0.6) == 0.0  # everything: 4 of 6


# -- Grad-CAM ------------------------------------------------------------------------------------------------------

SIZE, PATCH = 96, 16


def patched(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey noise with one small square patch at a random place: red is class 1, blue class 0."""
    rng = np.random.default_rng(seed)
    images = rng.integers(60, 196, (count, SIZE, SIZE, 3)).astype(np.uint8)
    labels = rng.integers(0, 2, count)
    corners = rng.integers(0, SIZE - PATCH, (count, 2))
    for image, label, (top, left) in zip(images, labels, corners):
        image[top : top + PATCH, left : left + PATCH] = (230, 30, 30) if label else (30, 30, 230)
    return images, labels, corners


@pytest.mark.slow
def test_heatmap_peak_lies_on_the_planted_patch():
    """Only the patch decides the class, anywhere in the image: the explained class's heatmap must peak on it
    (within half a cell of the explained layer's grid). Peaks at random would land there about 1 time in 5."""
    from sklearn.linear_model import LogisticRegression

    train, labels, _ = patched(64, 0)
    model = NormalizedClassifier(create_backbone("tf_efficientnet_lite0", "pypi", 2), [0.5] * 3, [0.5] * 3).eval()
    with torch.inference_mode():
        inputs = (torch.from_numpy(to_float_array(train)) - 0.5) / 0.5
        features = model.model.forward_head(model.model.forward_features(inputs), pre_logits=True).numpy()
    probe = LogisticRegression(max_iter=2000).fit(features, labels)
    with torch.no_grad():  # the probe as a two-class head
        model.model.classifier.weight.copy_(torch.from_numpy(np.concatenate([-probe.coef_, probe.coef_]) / 2))
        model.model.classifier.bias.copy_(torch.from_numpy(np.concatenate([-probe.intercept_, probe.intercept_]) / 2))
    images, truth, corners = patched(24, 1)
    with torch.inference_mode():
        predicted = model(torch.from_numpy(to_float_array(images))).argmax(1).numpy()
    assert (predicted == truth).mean() >= 0.9  # the model learned the patch
    layer = target_layer(model, SIZE)
    margin = SIZE // layer.side // 2
    maps = heatmaps(model, images, predicted)
    on_patch = [
        top - margin <= row < top + PATCH + margin and left - margin <= column < left + PATCH + margin
        for heatmap, (top, left) in zip(maps, corners)
        for row, column in [np.unravel_index(heatmap.argmax(), heatmap.shape)]
    ]
    assert np.mean(on_patch) >= 0.8, f"peaks on the patch: {np.mean(on_patch):.2f} ({layer.name})"


@pytest.mark.parametrize(
    "name, fusion, size, expected",
    [
        ("tf_efficientnet_lite0", None, 224, "model.bn2"),  # the final 7x7 conv map, as Grad-CAM usually explains
        ("tf_efficientnet_lite0", None, 80, "model.blocks.4"),  # final map 3x3: the stride-16 stage's 5x5
        ("tf_efficientnet_lite1", FusionSpec(mode="concat", stages=3, dim=16), 80, "model.backbone.blocks.4"),
        ("tf_efficientnet_lite2", FusionSpec(mode="attention", stages=2, dim=16), 32, "model.backbone.blocks.2"),
        ("vit_tiny_patch16_224", None, 224, "model.blocks.11.norm1"),  # tokens: the last block's input norm
    ],
)
def test_the_code_picks_the_layer_to_explain(name, fusion, size, expected):
    model = NormalizedClassifier(build_model(name, 3, "none", fusion=fusion), [0.5] * 3, [0.5] * 3).eval()
    layer = target_layer(model, size)
    assert layer.name == expected and layer.side >= 4
    maps = heatmaps(model, np.random.default_rng(0).integers(0, 255, (1, size, size, 3), dtype=np.uint8), [0])
    assert maps.shape == (1, size, size) and np.isfinite(maps).all()


# -- the pipeline --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Images of two other kinds for a digits model: printed letters in the digits' style, and colour shapes."""
    folder = tmp_path_factory.mktemp("foreign")
    for kind in ("letters", "shapes"):
        run(
            REPO,
            sys.executable,
            "-m",
            "stages.demo_data",
            "--kind",
            kind,
            "--out",
            str(folder / kind),
            "--per-class",
            "3",
        )
    return folder


def predict_table(project, *arguments: str) -> pd.DataFrame:
    result = run(project, str(BIN / "python"), "-m", "stages.predict", *arguments, "--out", "-", "--top-k", "1")
    return pd.read_csv(io.StringIO(result.stdout), keep_default_na=False, dtype={"pred_1": str}).set_index("path")


def test_the_registered_model_carries_the_rule_and_evaluate_reports_it(tiny_pipeline):
    card = FinetunedCard.read(tiny_pipeline / "models/finetuned")
    assert card.abstain is not None and (tiny_pipeline / "models/finetuned" / card.abstain.reference).is_file()
    assert 0.0 <= card.abstain.confidence_threshold <= 1.0 and card.abstain.keep_in_set == 0.99
    headline = json.loads((tiny_pipeline / "metrics/evaluate.json").read_text())["finetuned"]["test"]["abstain"]
    assert set(headline) == {"coverage", "accepted_accuracy"}
    curve = pd.read_csv(tiny_pipeline / "plots/evaluate/risk_coverage.csv")
    assert list(curve.columns) == ["coverage", "risk", "threshold"] and curve["coverage"].iloc[-1] == 1.0
    assert curve["threshold"].is_monotonic_decreasing
    from mlflow import MlflowClient

    runs = mlflow_runs(tiny_pipeline).set_index("tags.stage")
    logged = {item.path for item in MlflowClient().list_artifacts(runs.loc["evaluate", "run_id"], "evaluation")}
    assert {"evaluation/risk_coverage.png", "evaluation/heatmaps_least_confident.png"} <= logged
    assert "metrics.abstain/ood_threshold" in runs.columns and "metrics.finetuned.test_abstain.coverage" in runs.columns
    rule = json.loads((tiny_pipeline / "models/export/abstain.json").read_text())
    assert rule["ood_threshold"] == card.abstain.ood_threshold and rule["apply"]


def test_images_of_another_kind_are_flagged_and_in_set_kept(tiny_pipeline, foreign, tmp_path):
    table = predict_table(tiny_pipeline, str(foreign / "letters"), str(foreign / "shapes"), "data/images")
    kinds = table.index.str.extract(r"(letters|shapes|data/images)", expand=False).to_numpy()
    unknown = (table["reason"] == "unknown input").to_numpy()
    assert unknown[kinds == "shapes"].mean() == 1.0
    assert unknown[kinds == "letters"].mean() >= 0.9
    assert unknown[kinds == "data/images"].mean() <= 0.1  # training, val and test digits
    bare = predict_table(tiny_pipeline, str(foreign / "shapes"), "--no-abstain", "--explain", str(tmp_path))
    assert not bare["abstained"].any() and (bare["reason"] == "").all()
    assert bare["pred_1"].tolist() == table.loc[bare.index, "pred_1"].tolist()  # the same answer, bare
    overlays = sorted(tmp_path.glob("*.cam.png"))  # --explain: one overlay per file, named by its path
    assert [path.name for path in overlays] == sorted(f"{shape}__{n:04d}.cam.png" for shape in SHAPES for n in range(3))
