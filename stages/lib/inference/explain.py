"""`stages.predict --explain DIR`: a Grad-CAM overlay per file (model/gradcam.py), beside the predictions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from stages.lib.inference.classifier import ImageClassifier, ImageDecodeError, decode_image
from stages.lib.inference.predict import load_classifier
from stages.lib.model.gradcam import blend, heatmaps


def explain_files(model: str | ImageClassifier, files: list[Path], folder: Path) -> list[Path]:
    """One overlay PNG per readable file in folder (image | overlay of the predicted class), named by the file's
    path below the files' common folder (`a/b.png` -> `a__b.cam.png`); unreadable files are skipped (predict
    reports them). `model`: as `predict.load_classifier` takes."""
    classifier = model if isinstance(model, ImageClassifier) else load_classifier(str(model))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    common = Path(os.path.commonpath([path.resolve().parent for path in files])) if files else Path()
    for path in files:
        try:
            image = decode_image(path.read_bytes(), classifier.data_config)
        except (OSError, ImageDecodeError):
            continue
        predicted = classifier.probabilities(image[None]).argmax(1)
        overlay = blend(image, heatmaps(classifier.model, image[None], predicted)[0])
        target = folder / ("__".join(path.resolve().with_suffix("").relative_to(common).parts) + ".cam.png")
        Image.fromarray(np.hstack([np.repeat(image, 3, 2) if image.shape[2] == 1 else image, overlay])).save(target)
        written.append(target)
    return written
