"""`stages.predict`'s model and table: files and folders in, top-k predictions per file out.

- `image_files`: the files to predict (folders recursively, hidden files skipped);
- `load_predictor`: a model folder written by finetune, a local MLflow model folder, or an MLflow model
  URI (`models:/<name>@champion`; only then is MLflow imported) -> a predict function and the classes;
- `load_classifier`: the same sources -> the `ImageClassifier` itself (for `--explain`'s heatmaps);
- `predict_files`: one row per file with its error (empty when read), the abstain rule's answer
  (`abstained`, `reason`, `ood_score`: inference/abstain.py) and the top-k labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.core.errors import PipelineError
from stages.lib.core.store import tracking_uri
from stages.lib.inference.classifier import OUTPUT_COLUMNS, ImageClassifier


def image_files(paths: list[str | Path]) -> list[Path]:
    """The files to predict: each file as given, each folder's files recursively (sorted, hidden
    files skipped). A path that does not exist is kept, so that it is reported, not dropped."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            files.append(path)
    return files


def is_mlflow_model(model: str) -> bool:
    return "://" in model or model.startswith("models:/") or (Path(model) / "MLmodel").is_file()


def _load_pyfunc(model: str):
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(tracking_uri())
    try:
        return mlflow.pyfunc.load_model(model)
    except mlflow.exceptions.MlflowException as error:
        raise PipelineError(f"{model}: cannot load the model: {error.message}") from None


def load_predictor(model: str, abstain: bool = True):
    """(predict function: list of bytes -> DataFrame as `ImageClassifier.predict`, class names) for
    a model folder written by finetune, a local MLflow model folder, or an MLflow model URI such
    as `models:/<name>@champion` (resolved in the pipeline's MLflow store). abstain=False: the bare
    answer (never abstained)."""
    if is_mlflow_model(model):
        pyfunc = _load_pyfunc(model)
        classes = (pyfunc.metadata.metadata or {}).get("classes")
        if not classes:
            raise PipelineError(
                f"{model}: not an image classifier logged by this pipeline (no classes in its metadata)"
            )
        takes_params = pyfunc.metadata.get_params_schema() is not None  # versions logged before the rule: none
        options = {"params": {"abstain": abstain}} if takes_params else {}
        return (lambda values: pyfunc.predict(pd.DataFrame({"image": values}), **options)), classes
    classifier = ImageClassifier.from_folder(model)
    return (lambda values: classifier.predict(values, abstain=abstain)), classifier.classes


def load_classifier(model: str) -> ImageClassifier:
    """The `ImageClassifier` of a model folder, or of a pyfunc logged by this pipeline."""
    if not is_mlflow_model(model):
        return ImageClassifier.from_folder(model)
    inner = _load_pyfunc(model).unwrap_python_model()
    if not hasattr(getattr(inner, "classifier", None), "outputs"):  # the model's own copy of ImageClassifier
        raise PipelineError(f"{model}: not an image classifier logged by this pipeline")
    return inner.classifier


def read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def predict_files(files: list[Path], predict, classes: list[str], top_k: int, chunk: int = 64) -> pd.DataFrame:
    """One row per file: path, error (empty when read), abstained, reason, ood_score, pred_1, prob_1, ...
    pred_k, prob_k (abstained False and the rest empty where the model has no abstain rule)."""
    from tqdm import tqdm

    k = min(top_k, len(classes))
    rows = []
    for start in tqdm(range(0, len(files), chunk), desc="predict", unit="batch", disable=len(files) <= chunk):
        batch = files[start : start + chunk]
        contents = [read_bytes(path) for path in batch]
        readable = [i for i, data in enumerate(contents) if data is not None]
        frame = predict([contents[i] for i in readable]) if readable else pd.DataFrame(columns=OUTPUT_COLUMNS)
        results = dict(zip(readable, frame.to_dict(orient="records")))
        for i, path in enumerate(batch):
            result = results.get(i, {"error": "cannot read the file" if path.exists() else "file not found"})
            row = {"path": str(path), "error": result.get("error") or ""}
            if not row["error"]:
                score = result.get("ood_score")
                row["abstained"], row["reason"] = bool(result.get("abstained") or False), result.get("reason") or ""
                row["ood_score"] = None if score is None or pd.isna(score) else round(float(score), 6)
                probs = np.asarray(result["probabilities"])
                for rank, index in enumerate(np.argsort(-probs, kind="stable")[:k], start=1):
                    row[f"pred_{rank}"], row[f"prob_{rank}"] = classes[index], round(float(probs[index]), 6)
            rows.append(row)
    columns = ["path", "error", "abstained", "reason", "ood_score"] + [
        f"{name}_{rank}" for rank in range(1, k + 1) for name in ("pred", "prob")
    ]
    return pd.DataFrame(rows, columns=columns)
