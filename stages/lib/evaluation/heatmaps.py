"""Grad-CAM overlays where they help a reviewer: the worst test errors and the least confident correct answers.

`overlays_for(model, size, classes, images, labels, probabilities, count, folder)` writes
folder/heatmaps_errors.png (the `count` most confidently wrong test images, the heatmap of the class the model
said) and folder/heatmaps_least_confident.png (the `count` least confident correct ones); the layer is chosen
by `model.gradcam.target_layer`. What the heatmaps show and do not: docs/unknown.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from stages.lib.model.gradcam import blend, heatmaps, target_layer


def overlay_figure(images: np.ndarray, maps: np.ndarray, titles: list[str], path: Path, heading: str) -> None:
    """A grid: each image above its overlay, titled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(1, min(8, len(images)))
    rows = 2 * int(np.ceil(len(images) / columns)) if len(images) else 2
    figure, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.0 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index, (image, heatmap, title) in enumerate(zip(images, maps, titles)):
        top = axes[2 * (index // columns), index % columns]
        top.imshow(image.squeeze(), cmap="gray" if image.shape[2] == 1 else None)
        top.set_title(title, fontsize=7)
        axes[2 * (index // columns) + 1, index % columns].imshow(blend(image, heatmap))
    figure.suptitle(heading, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


@dataclass(frozen=True)
class Overlays:
    """The overlay figures evaluate wrote (None: nothing of that kind to show)."""

    errors: Path | None
    least_confident: Path | None
    layer: str


def overlays_for(
    model: nn.Module,
    size: int,
    classes: list[str],
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    count: int,
    folder: Path,
) -> Overlays:
    """The overlays of the module docstring; `model`: uint8-range float images (N, 3, size, size) -> logits."""
    predicted, confidence = probabilities.argmax(1), probabilities.max(1)
    wrong = np.flatnonzero(predicted != labels)
    right = np.flatnonzero(predicted == labels)
    chosen = {
        "errors": wrong[np.argsort(-confidence[wrong], kind="stable")][:count],
        "least_confident": right[np.argsort(confidence[right], kind="stable")][:count],
    }
    layer = target_layer(model, size).name
    written = {}
    for kind, index in chosen.items():
        if not len(index):
            written[kind] = None
            continue
        maps = heatmaps(model, images[index], predicted[index])
        titles = [f"true {classes[labels[i]]}, said {classes[predicted[i]]} {confidence[i]:.2f}" for i in index]
        heading = "most confident errors" if kind == "errors" else "least confident correct answers"
        written[kind] = folder / f"heatmaps_{kind}.png"
        overlay_figure(images[index], maps, titles, written[kind], f"Grad-CAM ({layer}): {heading}")
    return Overlays(written["errors"], written["least_confident"], layer)
