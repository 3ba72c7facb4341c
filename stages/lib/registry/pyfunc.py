"""The MLflow pyfunc around `inference.classifier.ImageClassifier`: finetune logs and registers it;
`mlflow models serve` and `stages.predict --model models:/...` load it.

- `ImageClassifierModel`: input, a DataFrame with a binary column `image` (over REST: base64 strings
  in `dataframe_split`); output, `ImageClassifier.predict`'s rows.
- `log_image_classifier` logs and registers it with this package's code, so the model loads without
  the project installed.
- `register_image_classifier` does that once per model: a version whose weights and card are byte-identical
  (the `model.digest` tag) is reused, so a forced or retried re-run adds no duplicate version.

Kept in the registry layer, apart from the loader, so that predicting with a model folder
(`stages.predict`, evaluate, export) does not import MLflow.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image

from stages.lib.core.digest import file_sha256, json_sha256
from stages.lib.core.errors import PipelineError
from stages.lib.inference.abstain import abstain_artifacts
from stages.lib.inference.classifier import ImageClassifier

PACKAGE = Path(__file__).resolve().parents[2]  # the `stages` package (stages/lib/registry/..), shipped with the model


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with a binary `image` column -> `ImageClassifier.predict`'s rows."""

    def load_context(self, context):
        self.classifier = ImageClassifier(Path(context.artifacts["weights"]), Path(context.artifacts["config"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """`params` {"abstain": false}: the bare answer (never abstained)."""
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise PipelineError(f"expected a column 'image' of encoded images, got {list(model_input.columns)}")
            values = model_input["image"].tolist()
        else:
            values = list(model_input)
        return self.classifier.predict(values, abstain=bool((params or {}).get("abstain", True)))


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


MODEL_CODE = """# The model's entry point (MLflow "models from code"): the pyfunc in stages/lib/registry/pyfunc.py.
import mlflow
from stages.lib.registry.pyfunc import ImageClassifierModel

mlflow.models.set_model(ImageClassifierModel())
"""


def _package_copy(destination: Path) -> Path:
    """This project's shared library (stages/__init__.py, stages/lib/) without caches, to ship inside the model."""
    target = destination / "stages"
    shutil.copytree(PACKAGE / "lib", target / "lib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(PACKAGE / "__init__.py", target / "__init__.py")
    return target


def log_image_classifier(model_dir: Path, example_image: np.ndarray, registered_name: str):
    """Log the model of model_dir (model.pt, config.json) as an `ImageClassifierModel` pyfunc in
    the active run, with signature, an input example (example_image, uint8 HWC, PNG-encoded) and
    the class list in its metadata, and register it as a new version of registered_name."""
    import PIL
    import timm
    import torch
    from mlflow.models import infer_signature

    model_dir = Path(model_dir)
    classifier = ImageClassifier.from_folder(model_dir)
    card = classifier.card
    example = pd.DataFrame({"image": [encode_png(example_image)]})
    output = classifier.predict(example["image"].tolist())
    with tempfile.TemporaryDirectory() as scratch:
        entry_point = Path(scratch) / "image_classifier.py"
        entry_point.write_text(MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=registered_name,
            python_model=str(entry_point),
            artifacts={"weights": str(model_dir / "model.pt"), "config": str(model_dir / "config.json")}
            | abstain_artifacts(model_dir, card),  # the rule's reference, beside config.json (inference/abstain.py)
            code_paths=[str(_package_copy(Path(scratch)))],
            signature=infer_signature(example, output, params={"abstain": True}),
            input_example=example,
            registered_model_name=registered_name,
            metadata={"classes": card.classes, "data_config": card.data_config, "input": "encoded image"},
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"timm=={timm.__version__}",
                f"pillow=={PIL.__version__}",
                f"pandas=={pd.__version__}",
                f"numpy=={np.__version__}",
            ],
        )


MODEL_DIGEST_TAG = "model.digest"  # on a registered version: the content of its model.pt and config.json


def model_digest(model_dir: Path) -> str:
    """The content of a model folder's weights and card."""
    return json_sha256({name: file_sha256(Path(model_dir) / name) for name in ("model.pt", "config.json")})
    # the rule's reference file is named with its sha256 in config.json, so the card's digest covers it


def register_image_classifier(model_dir: Path, example_image: np.ndarray, registered_name: str) -> tuple[str, bool]:
    """(version, reused): the registered version of the model in model_dir, logged and registered by
    `log_image_classifier` unless a version of `registered_name` already holds byte-identical files."""
    from mlflow import MlflowClient

    client, digest = MlflowClient(), model_digest(model_dir)
    same = client.search_model_versions(f"name = '{registered_name}' and tags.`{MODEL_DIGEST_TAG}` = '{digest}'")
    if same:
        return str(min(int(version.version) for version in same)), True
    info = log_image_classifier(model_dir, example_image, registered_name)
    version = str(info.registered_model_version)
    client.set_model_version_tag(registered_name, version, MODEL_DIGEST_TAG, digest)
    return version, False


def register_finetuned(model_dir: Path, example_image: np.ndarray, registered_name: str) -> str:
    """Register the fine-tuned model (or reuse its identical version) and tag the active run with the version
    (`registered.model`, `registered.version`, `registered.reused`)."""
    version, reused = register_image_classifier(model_dir, example_image, registered_name)
    mlflow.set_tags(
        {"registered.model": registered_name, "registered.version": version, "registered.reused": str(reused).lower()}
    )
    return version
