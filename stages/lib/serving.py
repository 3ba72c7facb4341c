"""Inference on encoded image files: the fine-tuned model with its own preprocessing, as evaluate,
export, `stages.predict` and the MLflow pyfunc (stages/lib/pyfunc.py) use it.

- `decode_image`: bytes of any image file -> uint8 (size, size, 3), exactly as the augment stage
  prepares training images (`preprocessing.DataConfig.decode`: upright, RGB, shorter side resized
  with the model's interpolation, centre crop). Unreadable data raises `ImageDecodeError`.
- `ImageClassifier`: the one model loader. A model folder (model.pt + config.json, as finetune
  writes it: backbone, classes, the preprocessing contract, the calibration temperature, and with
  `features.fusion_mode` the fusion head's `fusion` settings: `fusion.FusedClassifier`) ->
  `probabilities(uint8 images)` for evaluate and export, and `predict(list of bytes)`: a DataFrame with one row per image: `label`, `probability` (of that
  label), `probabilities` (every class, in `classes` order) and `error` (empty when the image
  was read; otherwise the reason, and the other columns are null). A bad image never fails
  the batch.
- `load_predictor` / `predict_files`: `stages.predict`'s model (a folder, or an MLflow model URI:
  only then is MLflow imported) and its table of top-k predictions per file.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.lib import PipelineError
from stages.lib.preprocessing import DataConfig

OUTPUT_COLUMNS = ["label", "probability", "probabilities", "error"]


def __getattr__(name: str):
    """`ImageClassifierModel` for model versions registered before it moved to pyfunc.py: their entry point
    imports it from here, and in a process that has imported this project's `stages` (as `stages.predict
    --model models:/...` has) that import finds this module, not the copy shipped with the model."""
    if name == "ImageClassifierModel":
        from stages.lib.pyfunc import ImageClassifierModel

        return ImageClassifierModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

        from stages.lib.backbones import NormalizedClassifier, create_backbone

        self.config = json.loads(Path(config).read_text())
        self.classes: list[str] = self.config["classes"]
        self.data_config = DataConfig.from_dict(self.config["data_config"], str(config))
        self.size: int = self.data_config.size
        self.temperature: float = float(self.config.get("temperature", 1.0))
        self.batch_size = batch_size
        backbone = create_backbone(self.config["model"], "none", self.config["num_classes"])
        fusion = self.config.get("fusion")  # {mode, stages, dim}: a fusion head over the backbone's stages
        if fusion:
            from stages.lib.fusion import fused_model

            backbone = fused_model(backbone, fusion["mode"], fusion["stages"], fusion["dim"], self.config["num_classes"])
        backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model = NormalizedClassifier(backbone, self.data_config.mean, self.data_config.std,
                                          self.temperature).eval()

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

        from stages.lib.prepared import to_float_batch

        outputs = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                outputs.append(self.model(to_float_batch(images[start:start + self.batch_size])).float().numpy())
        return np.concatenate(outputs) if outputs else np.empty((0, len(self.classes)), dtype=np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, size, size, 3) -> calibrated class probabilities (N, classes)."""
        from stages.lib.metrics import softmax

        return softmax(self.logits(images))

    def predict(self, values) -> pd.DataFrame:
        """Encoded images (bytes, or base64 text) -> one row each: label, probability, probabilities, error."""
        rows = [{"label": None, "probability": None, "probabilities": None, "error": ""} for _ in values]
        decoded, positions = [], []
        for position, value in enumerate(values):
            try:
                decoded.append(decode_image(as_bytes(value), self.data_config))
                positions.append(position)
            except ImageDecodeError as error:
                rows[position]["error"] = str(error)
        if decoded:
            for position, probs in zip(positions, self.probabilities(np.stack(decoded))):
                best = int(probs.argmax())
                rows[position].update(label=self.classes[best], probability=float(probs[best]),
                                      probabilities=[float(p) for p in probs])
        # object columns keep None as None, so a failed row is null in JSON, never NaN
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object)


# ------------------------------------------------------------------------ batch prediction
def image_files(paths: list[str | Path]) -> list[Path]:
    """The files to predict: each file as given, each folder's files recursively (sorted, hidden
    files skipped). A path that does not exist is kept, so that it is reported, not dropped."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        else:
            files.append(path)
    return files


def load_predictor(model: str):
    """(predict function: list of bytes -> DataFrame as `ImageClassifier.predict`, class names) for
    a model folder written by finetune, a local MLflow model folder, or an MLflow model URI such
    as `models:/<name>@champion` (resolved in the pipeline's MLflow store)."""
    if "://" in model or model.startswith("models:/") or (Path(model) / "MLmodel").is_file():
        import mlflow
        import mlflow.pyfunc

        from stages.lib.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        try:
            pyfunc = mlflow.pyfunc.load_model(model)
        except mlflow.exceptions.MlflowException as error:
            raise PipelineError(f"{model}: cannot load the model: {error.message}") from None
        classes = (pyfunc.metadata.metadata or {}).get("classes")
        if not classes:
            raise PipelineError(f"{model}: not an image classifier logged by this pipeline (no classes in its metadata)")
        return (lambda values: pyfunc.predict(pd.DataFrame({"image": values}))), classes
    classifier = ImageClassifier.from_folder(model)
    return classifier.predict, classifier.classes


def read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def predict_files(files: list[Path], predict, classes: list[str], top_k: int, chunk: int = 64) -> pd.DataFrame:
    """One row per file: path, error (empty when read), pred_1, prob_1, ... pred_k, prob_k."""
    from tqdm import tqdm

    k = min(top_k, len(classes))
    rows = []
    for start in tqdm(range(0, len(files), chunk), desc="predict", unit="batch", disable=len(files) <= chunk):
        batch = files[start:start + chunk]
        contents = [read_bytes(path) for path in batch]
        readable = [i for i, data in enumerate(contents) if data is not None]
        frame = predict([contents[i] for i in readable]) if readable else pd.DataFrame(columns=OUTPUT_COLUMNS)
        results = dict(zip(readable, frame.to_dict(orient="records")))
        for i, path in enumerate(batch):
            result = results.get(i, {"error": "cannot read the file" if path.exists() else "file not found"})
            row = {"path": str(path), "error": result.get("error") or ""}
            if not row["error"]:
                probs = np.asarray(result["probabilities"])
                for rank, index in enumerate(np.argsort(-probs, kind="stable")[:k], start=1):
                    row[f"pred_{rank}"], row[f"prob_{rank}"] = classes[index], round(float(probs[index]), 6)
            rows.append(row)
    columns = ["path", "error"] + [f"{name}_{rank}" for rank in range(1, k + 1) for name in ("pred", "prob")]
    return pd.DataFrame(rows, columns=columns)
