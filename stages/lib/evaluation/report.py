"""evaluate's report: both models scored on val and test, the metrics, and the files a reviewer reads.

- `score_splits`: per split, the images, labels, paths and each model's probabilities (the linear-probe
  baseline from its cached embeddings and head, the fine-tuned model's answers from a callable: its
  probabilities and the abstain rule's decisions).
- `evaluate_models`: the test metrics of both models, the fine-tuned model's val metrics, calibration, and the
  abstain rule on test (selective prediction: coverage, accuracy on the accepted, the OOD rate), once.
- `write_reports`: predictions.csv (every val and test image, both models: what `make gate` compares),
  metrics.json, per_class.csv, confusion matrices, reliability diagram, error gallery, the risk-coverage
  curve on val, and the DVC plot files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.core.arrays import softmax
from stages.lib.data.images import read_labelled_csv
from stages.lib.data.prepared import load_split
from stages.lib.evaluation.comparison import predictions_frame
from stages.lib.evaluation.figures import confusion_figure, error_gallery, reliability_figure
from stages.lib.evaluation.metrics import classification_metrics, expected_calibration_error, per_class_table
from stages.lib.evaluation.selective import SelectiveReport, risk_coverage_outputs, selective_report
from stages.lib.model.abstention import AbstainSpec, Decisions
from stages.lib.model.baseline import load_linear_head

SPLITS = ("val", "test")
PREDICTIONS = "predictions.csv"  # in the reports folder, also the MLflow artifact evaluation/predictions.csv


@dataclass
class SplitScores:
    """One split: its images (uint8 NHWC), labels, image paths, each model's probabilities, and the fine-tuned
    model's abstain decisions."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    probabilities: dict[str, np.ndarray]  # model ("baseline", "finetuned") -> (N, classes)
    decisions: Decisions


@dataclass
class Evaluation:
    """The metrics of one evaluation: test for both models, val for the fine-tuned one, and the calibration
    curves (name -> (ECE, reliability bins)) of the fine-tuned model with and without its temperature."""

    test: dict[str, dict[str, float]]
    val: dict[str, float]
    calibration: dict[str, tuple[float, list[dict]]]
    selective: SelectiveReport  # the abstain rule on test

    def results(self) -> dict:
        """Every metric (reports/evaluate/metrics.json and the MLflow run)."""
        uncalibrated = {"ece_uncalibrated": self.calibration["fine-tuned, uncalibrated"][0]}
        return {
            "baseline": {"test": self.test["baseline"]},
            "finetuned": {
                "test": self.test["finetuned"] | uncalibrated,
                "val": self.val,
                "test_abstain": self.selective.details(),
            },
        }

    def headline(self) -> dict:
        """metrics/evaluate.json: the numbers `dvc metrics diff` shows."""
        return {
            "baseline": {"test": {"accuracy": self.test["baseline"]["accuracy"]}},
            "finetuned": {
                "test": {k: self.test["finetuned"][k] for k in ("accuracy", "macro_f1", "ece")}
                | {"abstain": self.selective.headline()},  # coverage, accepted accuracy, OOD rate
                "val": {"accuracy": self.val["accuracy"]},
            },
        }


def baseline_probabilities(features_file: Path, head_file: Path) -> dict[str, np.ndarray]:
    """The linear-probe baseline's probabilities on val and test, from its cached embeddings and head."""
    head = load_linear_head(head_file)
    with np.load(features_file) as arrays:
        return {split: softmax(head.logits(arrays[f"{split}_x"])) for split in SPLITS}


def score_splits(
    prepared: Path, splits: Path, baseline: dict[str, np.ndarray], finetuned: Callable
) -> dict[str, SplitScores]:
    """Val and test of the prepared cache (paths from the split CSVs), each scored by both models; `finetuned`
    maps images to the fine-tuned model's answers (`.probabilities`, `.decisions`)."""
    scores = {}
    for split in SPLITS:
        images, labels = load_split(prepared, split)
        paths = read_labelled_csv(splits / f"{split}.csv")["path"].tolist()
        answers = finetuned(images)
        probabilities = {"baseline": baseline[split], "finetuned": answers.probabilities}
        scores[split] = SplitScores(images, labels, paths, probabilities, answers.decisions)
    return scores


def evaluate_models(scores: dict[str, SplitScores], uncalibrated_test: np.ndarray, top_k: int) -> Evaluation:
    """Both models' test metrics, the fine-tuned model's val metrics, and the calibration on test
    (`uncalibrated_test`: the fine-tuned model's test probabilities without its temperature)."""
    test, val = scores["test"], scores["val"]
    return Evaluation(
        test={model: classification_metrics(test.labels, p, top_k) for model, p in test.probabilities.items()},
        val=classification_metrics(val.labels, val.probabilities["finetuned"], top_k),
        calibration={
            "fine-tuned, calibrated": expected_calibration_error(test.probabilities["finetuned"], test.labels),
            "fine-tuned, uncalibrated": expected_calibration_error(uncalibrated_test, test.labels),
            "linear probe": expected_calibration_error(test.probabilities["baseline"], test.labels),
        },
        selective=selective_report(test.labels, test.probabilities["finetuned"], test.decisions),
    )


def write_reports(
    folder: Path,
    plots: Path,
    scores: dict[str, SplitScores],
    evaluation: Evaluation,
    classes: list[str],
    gallery: int,
    abstain: AbstainSpec | None,
) -> pd.DataFrame:
    """The report files (see the module docstring) and the DVC plot files; returns the predictions table.
    abstain: the model's rule, whose confidence threshold the risk-coverage figure marks."""
    folder.mkdir(parents=True, exist_ok=True)
    predictions = pd.concat(
        [
            predictions_frame(split, model, scored.paths, scored.labels, probs, classes)
            for split, scored in scores.items()
            for model, probs in scored.probabilities.items()
        ],
        ignore_index=True,
    )
    predictions.to_csv(folder / PREDICTIONS, index=False)
    (folder / "metrics.json").write_text(json.dumps(evaluation.results(), indent=2, sort_keys=True) + "\n")
    test = scores["test"]
    per_class = per_class_table(test.labels, {m: p.argmax(1) for m, p in test.probabilities.items()}, classes)
    per_class.to_csv(folder / "per_class.csv", index=False, float_format="%.4f")
    write_plots(plots, classes, test, per_class, evaluation.calibration["fine-tuned, calibrated"][1])
    reliability_figure(evaluation.calibration, folder / "reliability.png")
    for model, probs in test.probabilities.items():
        title = f"{model}: test accuracy {evaluation.test[model]['accuracy']:.4f}"
        confusion_figure(test.labels, probs.argmax(1), classes, folder / f"confusion_{model}.png", title)
    if gallery:
        probs = test.probabilities["finetuned"]
        error_gallery(test.images, test.labels, probs, classes, gallery, folder / "error_gallery.png")
    val = scores["val"]
    risk_coverage_outputs(val.labels, val.probabilities["finetuned"], abstain, plots, folder)
    return predictions


def write_plots(
    folder: Path, classes: list[str], test: SplitScores, per_class: pd.DataFrame, reliability: list[dict]
) -> None:
    """The DVC plot files: confusion.csv, per_class_f1.csv, reliability.csv (fine-tuned, test)."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "actual": [classes[i] for i in test.labels],
            "predicted": [classes[i] for i in test.probabilities["finetuned"].argmax(1)],
        }
    ).to_csv(folder / "confusion.csv", index=False)
    per_class[["class", "baseline_f1", "finetuned_f1"]].to_csv(
        folder / "per_class_f1.csv", index=False, float_format="%.4f"
    )
    pd.DataFrame(
        [
            {"confidence": row["confidence"], "accuracy": row["accuracy"], "perfectly calibrated": row["confidence"]}
            for row in reliability
        ]
    ).to_csv(folder / "reliability.csv", index=False)
