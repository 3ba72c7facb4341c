"""Classification metrics (scikit-learn): accuracy and its kin, top-k, calibration error, per-class scores."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 10
) -> tuple[float, list[dict]]:
    """ECE over equal-width confidence bins, and the per-bin rows of a reliability diagram."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, rows = 0.0, []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if not inside.any():
            continue
        accuracy, mean_confidence = float(correct[inside].mean()), float(confidence[inside].mean())
        ece += inside.mean() * abs(accuracy - mean_confidence)
        rows.append(
            {"confidence": round(mean_confidence, 4), "accuracy": round(accuracy, 4), "count": int(inside.sum())}
        )
    return float(ece), rows


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Fraction of samples whose true class is among the k most probable (k capped at the class count)."""
    from sklearn.metrics import top_k_accuracy_score

    classes = probabilities.shape[1]
    if k >= classes:
        return 1.0
    scores = probabilities[:, 1] if classes == 2 else probabilities  # sklearn's binary form
    return float(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(classes)))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, top_k: int = 3) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro precision/recall/F1, top-k accuracy, log loss, ECE.

    labels: int (N,) class indexes; probabilities: (N, classes), rows summing to 1.
    `top_k_accuracy` uses k = top_k (the key stays the same when k changes, for `dvc metrics diff`).
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        log_loss,
        precision_recall_fscore_support,
    )

    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_precision": float(precision),
        "macro_recall": float(recall),
        "macro_f1": float(f1),
        "top_k_accuracy": top_k_accuracy(labels, probabilities, top_k),
        "log_loss": float(log_loss(labels, probabilities, labels=np.arange(probabilities.shape[1]))),
        "ece": expected_calibration_error(probabilities, labels)[0],
    }


def per_class_table(labels: np.ndarray, predictions: dict[str, np.ndarray], classes: list[str]) -> pd.DataFrame:
    """Precision, recall and F1 per class, models side by side: one row per class.

    predictions: model name -> predicted class indexes (N,). Columns: class, support, then
    `<model>_precision`, `<model>_recall`, `<model>_f1` for each model.
    """
    import pandas as pd
    from sklearn.metrics import precision_recall_fscore_support

    indexes = np.arange(len(classes))
    table = pd.DataFrame({"class": classes, "support": np.bincount(labels, minlength=len(classes))})
    for name, predicted in predictions.items():
        precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, labels=indexes, zero_division=0)
        table[f"{name}_precision"], table[f"{name}_recall"], table[f"{name}_f1"] = precision, recall, f1
    return table
