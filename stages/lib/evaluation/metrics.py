"""Classification metrics (scikit-learn) and the figures reviewers look at."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.25, 4.0)) -> float:
    """Temperature scaling (Guo et al., 2017): the T minimising the negative log-likelihood of
    softmax(logits / T) on held-out data (val), searched on log T within `bounds` (scipy). The lower
    bound matters on a near-perfect val set, where the NLL optimum runs to extreme sharpness."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits, rows = np.asarray(logits, dtype=np.float64), np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    return float(np.exp(minimize_scalar(nll, bounds=tuple(np.log(bounds)), method="bounded").x))


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


def confusion_figure(labels: np.ndarray, predicted: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(5, 0.5 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        labels, predicted, labels=np.arange(len(classes)), display_labels=classes, ax=axes, colorbar=False, cmap="Blues"
    )
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def reliability_figure(curves: dict[str, tuple[float, list[dict]]], path: Path) -> None:
    """A reliability diagram: per model, the bins of `expected_calibration_error` as accuracy
    against mean confidence. curves: model name -> what `expected_calibration_error` returns (ECE, bin rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for name, (ece, rows) in curves.items():
        axes.plot(
            [row["confidence"] for row in rows],
            [row["accuracy"] for row in rows],
            marker="o",
            label=f"{name} (ECE {ece:.3f})",
        )
    axes.set(
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        xlabel="confidence (bin mean)",
        ylabel="accuracy in bin",
        title="reliability on the test split",
    )
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def line_figure(
    rows: list[dict], x: str, series: list[str], path: Path, title: str, boundaries: list[int] = ()
) -> None:
    """A line chart of the given columns against x (learning curves), with phase boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name in series:
        axes.plot([row[x] for row in rows], [row[name] for row in rows], marker="o", label=name)
    for boundary in boundaries:
        axes.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel(x)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def error_gallery(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, classes: list[str], count: int, path: Path
) -> int:
    """The most confidently wrong images (uint8 NHWC) with true and predicted labels; returns how many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    columns = max(1, min(8, len(wrong)))
    rows = max(1, int(np.ceil(len(wrong) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, wrong):
        axis.imshow(images[index])
        axis.set_title(
            f"true {classes[labels[index]]}\npred {classes[predicted[index]]} "
            f"({probabilities[index, predicted[index]]:.2f})",
            fontsize=8,
        )
    if not len(wrong):
        axes.flat[0].text(0.5, 0.5, "no errors", ha="center", va="center")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return len(wrong)
