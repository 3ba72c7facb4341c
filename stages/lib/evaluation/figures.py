"""The figures reviewers look at: confusion matrices, reliability diagrams, learning curves, error galleries."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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


def learning_curves(history: list[dict], path: Path) -> None:
    """Fine-tuning's train loss, val loss and val accuracy per epoch, dashed lines where a phase ends."""
    ends = [row["epoch"] for row, after in zip(history, history[1:]) if row["phase_index"] != after["phase_index"]]
    line_figure(
        history,
        "epoch",
        ["train_loss", "val_loss", "val_accuracy"],
        path,
        "fine-tuning (dashed: phase boundaries)",
        ends,
    )
