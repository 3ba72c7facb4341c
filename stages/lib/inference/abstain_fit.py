"""Choosing the abstain rule of a model folder on val (finetune, before the model is registered), and
applying it to arrays of images (`answers_on`: evaluate; `export_agreement`: the export folder's rule
on the ONNX outputs against PyTorch's; `fit_own_rules`: the export's int8 variant's own rule).

`fit_abstention(model_dir, prepared, settings)`: after training and calibration, embeds the training
images (at most `settings.reference_images`, spread over the split: their class means and shared covariance
are the reference) and the val images,
chooses the OOD threshold (keep `keep_in_set` of val) and the confidence threshold (the lowest whose
accepted val images reach `target_accuracy`, among those the OOD threshold keeps), writes the reference
beside the card and the rule into it (`FinetunedCard.abstain`). Returns an `AbstentionFit` for the log
and MLflow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stages.lib.core.arrays import softmax
from stages.lib.core.digest import file_sha256
from stages.lib.core.params import Abstain
from stages.lib.data.prepared import load_split
from stages.lib.inference.classifier import ImageClassifier
from stages.lib.model.abstention import (
    REFERENCE_FILE,
    AbstainSpec,
    Decisions,
    Reference,
    choose_confidence_threshold,
    decide,
    ood_threshold_for,
)


@dataclass(frozen=True)
class AbstentionFit:
    """What finetune chose on val, for the log and MLflow."""

    ood_threshold: float
    confidence_threshold: float
    val_coverage: float
    val_accepted_accuracy: float
    val_ood_rate: float
    reference_images: int

    def metrics(self) -> dict[str, float]:
        return {f"abstain/{key}": float(value) for key, value in asdict(self).items()}


def spread(count: int, at_most: int) -> np.ndarray:
    """At most `at_most` indices spread evenly over range(count)."""
    return np.unique(np.linspace(0, count - 1, min(count, at_most)).astype(int)) if count else np.empty(0, int)


def accepted_on(probabilities: np.ndarray, scores: np.ndarray, labels: np.ndarray, spec: AbstainSpec) -> dict:
    """The rule's val record: the share of images it accepts and the accuracy on those."""
    accepted = ~decide(probabilities, scores, spec).abstained
    correct = probabilities.argmax(1) == labels
    return {
        "val_coverage": round(float(accepted.mean()), 6),
        "val_accepted_accuracy": round(float(correct[accepted].mean()) if accepted.any() else 0.0, 6),
    }


def fit_abstention(model_dir: Path, prepared: Path, settings: Abstain) -> AbstentionFit:
    """Choose the rule on val, write the reference beside the card and the rule into it (see the module doc)."""
    model_dir = Path(model_dir)
    classifier = ImageClassifier.from_folder(model_dir)
    train, train_labels = load_split(prepared, "train")
    chosen = spread(len(train), settings.reference_images)
    reference = Reference.fit(classifier.outputs(train[chosen])[1], train_labels[chosen])
    reference.save(model_dir / REFERENCE_FILE)
    images, labels = load_split(prepared, "val")
    logits, embeddings = classifier.outputs(images)
    probabilities = softmax(logits)
    scores = reference.scores(embeddings)
    ood_threshold = ood_threshold_for(scores, settings.keep_in_set)
    known = scores <= ood_threshold
    correct = probabilities.argmax(1) == labels
    confidence_threshold = choose_confidence_threshold(
        probabilities.max(1)[known], correct[known], settings.target_accuracy
    )
    spec = AbstainSpec(
        ood_threshold=round(ood_threshold, 6),
        confidence_threshold=round(confidence_threshold, 6),
        reference_sha256=file_sha256(model_dir / REFERENCE_FILE),
        reference_images=len(chosen),
        keep_in_set=settings.keep_in_set,
        target_accuracy=settings.target_accuracy,
        val_coverage=0.0,
        val_accepted_accuracy=0.0,
    )
    spec = spec.model_copy(update=accepted_on(probabilities, scores, labels, spec))
    classifier.card.model_copy(update={"abstain": spec}).write(model_dir)
    return AbstentionFit(
        spec.ood_threshold,
        spec.confidence_threshold,
        spec.val_coverage,
        spec.val_accepted_accuracy,
        float((~known).mean()),
        len(chosen),
    )


@dataclass(frozen=True)
class Answers:
    """A model's answers on N images: calibrated probabilities, and its abstain rule's decisions."""

    probabilities: np.ndarray
    decisions: Decisions


def answers_on(classifier: ImageClassifier, images: np.ndarray) -> Answers:
    """The classifier and its rule on uint8 images (a model without a rule answers everything)."""
    logits, embeddings = classifier.outputs(images)
    probabilities = softmax(logits)
    if classifier.abstainer is None:
        return Answers(probabilities, decide(probabilities, np.zeros(len(images)), None))
    return Answers(probabilities, classifier.abstainer.decide(probabilities, embeddings))


def onnx_outputs(path: Path, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An ONNX file's (logits, embedding) on uint8 NHWC images."""
    import onnxruntime as ort

    from stages.lib.data.pixels import to_float_array

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [
        session.run(["logits", "embedding"], {"image": to_float_array(images[start : start + batch_size])})
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


def fit_own_rules(folder: Path, files: dict[str, Path], spec: AbstainSpec | None, train: tuple, val: tuple) -> dict:
    """For each variant in `files` that has its own rule (`abstain.OWN_RULE`: int8), the model's rule refitted
    on that file's outputs, as `fit_abstention` fits it: the reference from the same training images
    (`train`: images, labels), the OOD threshold keeping `keep_in_set` of `val`; the confidence threshold is the
    model's (int8 keeps the classifier in float32: the logits barely move). Returns {variant: rule file}."""
    from stages.lib.inference.abstain import OWN_RULE, rule_files, write_rule

    written = {}
    for variant in (v for v in files if v in OWN_RULE and spec is not None):
        rule_name, reference_name = rule_files(variant)
        chosen = spread(len(train[0]), spec.reference_images)
        reference = Reference.fit(onnx_outputs(files[variant], train[0][chosen])[1], train[1][chosen])
        reference.save(Path(folder) / reference_name)
        logits, embeddings = onnx_outputs(files[variant], val[0])
        scores = reference.scores(embeddings)
        own = spec.model_copy(
            update={
                "ood_threshold": round(ood_threshold_for(scores, spec.keep_in_set), 6),
                "reference": reference_name,
                "reference_sha256": file_sha256(Path(folder) / reference_name),
            }
        )
        own = own.model_copy(update=accepted_on(softmax(logits), scores, val[1], own))
        written[variant] = write_rule(Path(folder) / rule_name, own)
    return written


def export_agreement(folder: Path, files: dict[str, Path], expected: Decisions, images: np.ndarray) -> dict:
    """Per ONNX variant in `files`: {"abstain_agreement": share of `images` on which the export folder's rule
    for that variant (`abstain.json`, or its own) applied to the file's outputs abstains exactly where PyTorch's
    (`expected`) does}."""
    from stages.lib.inference.abstain import read_export_rule

    results = {}
    for variant, path in files.items():
        rule = read_export_rule(folder, variant) if variant.startswith("onnx") else None
        if rule is not None:
            logits, embedding = onnx_outputs(path, images)
            agree = rule.decide(softmax(logits), embedding).abstained == expected.abstained
            results[variant] = {"abstain_agreement": float(agree.mean())}
    return results
