"""Inference on encoded image files: the fine-tuned model with its own preprocessing, as evaluate,
export, `stages.predict` and the MLflow pyfunc (stages/lib/registry/pyfunc.py) use it.

- `decode_image`: bytes of any image file -> uint8 (size, size, 3), exactly as the augment stage
  prepares training images (`preprocessing.DataConfig.decode`: upright, RGB, shorter side resized
  with the model's interpolation, centre crop). Unreadable data raises `ImageDecodeError`.
- `ImageClassifier`: the one model loader. A model folder (model.pt + config.json, the model card
  finetune writes: `card.FinetunedCard`) -> `probabilities(uint8 images)` for evaluate and export, and
  `predict(list of bytes)`: a DataFrame with one row per image: `label`, `probability` (of that label),
  `probabilities` (every class, in `classes` order), `error` (empty when the image was read; otherwise
  the reason, and the other columns are null), and the abstain rule's `ood_score`, `abstained` and `reason`
  (inference/abstain.py). A bad image never fails the batch.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.lib.core.arrays import batched, softmax
from stages.lib.core.errors import PipelineError
from stages.lib.data.pixels import to_float_batch
from stages.lib.data.preprocessing import DataConfig
from stages.lib.inference.abstain import Abstainer, answer_columns
from stages.lib.model.abstention import with_embedding
from stages.lib.model.backbones import NormalizedClassifier
from stages.lib.model.card import FinetunedCard

OUTPUT_COLUMNS = ["label", "probability", "probabilities", "error", "ood_score", "abstained", "reason"]


class ImageDecodeError(PipelineError, ValueError):
    """One input is not a readable image."""


def as_bytes(value) -> bytes:
    """Raw bytes of one input value: bytes as they are; a str is taken as base64."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ImageDecodeError("a text value must be base64-encoded image bytes") from None
    raise ImageDecodeError(f"expected encoded image bytes, got {type(value).__name__}")


def decode_image(data: bytes, config: DataConfig) -> np.ndarray:
    """One encoded image -> uint8 (size, size, 3), prepared as the augment stage prepares training data."""
    if not data:
        raise ImageDecodeError("empty input (no image bytes; over REST send the file base64-encoded)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return config.decode(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("image too large (decompression-bomb guard)") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"corrupt image: {error}") from None


class ImageClassifier:
    """The fine-tuned model of a folder with model.pt and config.json, ready for encoded images."""

    def __init__(self, weights: Path, config: Path, batch_size: int = 64):
        import torch

        self.card = FinetunedCard.read(config)
        self.classes: list[str] = self.card.classes
        self.data_config = self.card.preprocessing
        self.size: int = self.data_config.size
        self.temperature: float = self.card.temperature
        self.batch_size = batch_size
        network = self.card.build_model()
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model = NormalizedClassifier(network, self.data_config.mean, self.data_config.std, self.temperature).eval()
        self.embedder, self.abstainer = with_embedding(self.model), Abstainer.of_folder(Path(config).parent, self.card)

    @classmethod
    def from_folder(cls, folder: str | Path, batch_size: int = 64) -> "ImageClassifier":
        folder = Path(folder)
        for name in ("model.pt", "config.json"):
            if not (folder / name).is_file():
                raise PipelineError(f"{folder}: no {name} (expected a model folder written by the finetune stage)")
        return cls(folder / "model.pt", folder / "config.json", batch_size)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, size, size, 3) -> calibrated logits (N, classes), float32."""
        import torch

        with torch.inference_mode():
            return batched(
                lambda batch: self.model(to_float_batch(batch)).float().numpy(),
                images,
                self.batch_size,
                empty=np.empty((0, len(self.classes)), dtype=np.float32),
            )

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, size, size, 3) -> (calibrated logits (N, classes), embeddings (N, D): the classifier's input)."""
        import torch

        with torch.inference_mode():
            parts = [
                self.embedder(to_float_batch(images[i : i + self.batch_size]))
                for i in range(0, len(images), self.batch_size)
            ]
        if not parts:
            return np.empty((0, len(self.classes)), np.float32), np.empty((0, 0), np.float32)
        return tuple(np.concatenate([part[j].float().numpy() for part in parts]) for j in (0, 1))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, size, size, 3) -> calibrated class probabilities (N, classes)."""
        return softmax(self.logits(images))

    def predict(self, values, abstain: bool = True) -> pd.DataFrame:
        """Encoded images (bytes, or base64 text) -> one row each: label, probability, probabilities, error,
        ood_score, abstained, reason (abstain=False, or a card without a rule: never abstained)."""
        rows = [dict.fromkeys(OUTPUT_COLUMNS) | {"error": ""} for _ in values]
        decoded, positions = [], []
        for position, value in enumerate(values):
            try:
                decoded.append(decode_image(as_bytes(value), self.data_config))
                positions.append(position)
            except ImageDecodeError as error:
                rows[position]["error"] = str(error)
        if decoded:
            logits, embeddings = self.outputs(np.stack(decoded))
            probabilities = softmax(logits)
            answers = answer_columns(self.abstainer if abstain else None, probabilities, embeddings)
            for position, probs, answer in zip(positions, probabilities, answers):
                best = int(probs.argmax())
                rows[position].update(
                    label=self.classes[best], probability=float(probs[best]), probabilities=[float(p) for p in probs]
                )
                rows[position].update(answer)
        # object columns keep None as None, so a failed row is null in JSON, never NaN
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object)
