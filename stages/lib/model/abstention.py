"""The abstain rule: when the model should not answer, and why. One rule, applied wherever the model answers
(`inference.classifier.ImageClassifier` behind `stages.predict` and the MLflow pyfunc, and the ONNX export
folder's documented post-processing), so each gives the same `ood_score`, `abstained` and `reason`.

Two reasons, checked in this order:
- `unknown input`: the image's embedding (the classifier's input, `WithEmbedding`) is far from the training
  images': the out-of-distribution score is its squared Mahalanobis distance to the nearest class mean of the
  training embeddings, with one shared covariance (Ledoit-Wolf shrinkage, scikit-learn; Lee et al. 2018),
  above `ood_threshold` (chosen on val to keep `keep_in_set` of the in-set images). Of the scores compared in
  benchmarks/abstain.py (max softmax, energy, kNN distances, cleanlab's OutOfDistribution) it told the digits
  from printed letters and shapes best.
- `low confidence`: the calibrated top probability is below `confidence_threshold` (chosen on val as the
  lowest threshold whose accepted val images reach `target_accuracy`; see `choose_confidence_threshold`).

`AbstainSpec` is the rule's typed record in the model card (`card.FinetunedCard.abstain`); the statistics it
needs (`Reference`: class means and the whitening matrix) are a .npz file beside the card. The distance is two
matrix products in numpy, so the ONNX folder needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

REFERENCE_FILE = "abstain_reference.npz"  # beside config.json (and in the ONNX export folder)
UNKNOWN, LOW_CONFIDENCE = "unknown input", "low confidence"


class AbstainSpec(BaseModel):
    """The abstain rule of a model, as the model card stores it."""

    model_config = ConfigDict(extra="forbid")
    score: str = "mahalanobis"  # the OOD score: squared Mahalanobis distance to the nearest class mean
    ood_threshold: float  # scores above it: `unknown input`
    confidence_threshold: float = Field(ge=0.0, le=1.0)  # top probability below it: `low confidence`
    reference: str = REFERENCE_FILE  # the training embeddings' statistics (`Reference`), beside the card
    reference_sha256: str
    reference_images: int
    keep_in_set: float  # what the OOD threshold was chosen for, on val
    target_accuracy: float  # what the confidence threshold was chosen for, on val
    val_coverage: float  # val images the whole rule accepts
    val_accepted_accuracy: float  # accuracy on those


@dataclass(frozen=True)
class Decisions:
    """The rule's answer for N images."""

    ood_score: np.ndarray  # (N,) float
    abstained: np.ndarray  # (N,) bool
    reason: list[str]  # "" when answered, else UNKNOWN or LOW_CONFIDENCE


@dataclass(frozen=True)
class Reference:
    """What the OOD score needs of the training embeddings: the class means (C, D) and a whitening matrix
    W (D, D), W W^T = the shared precision, so that score(x) = min over classes c of |(x - mean_c) W|^2."""

    means: np.ndarray
    whitening: np.ndarray

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray) -> "Reference":
        """Class means and the Ledoit-Wolf shrunk covariance of the class-centred embeddings (N, D)."""
        from sklearn.covariance import LedoitWolf

        embeddings = np.asarray(embeddings, dtype=np.float64)
        classes = np.unique(labels)
        means = np.stack([embeddings[labels == c].mean(axis=0) for c in classes])
        centred = embeddings - means[np.searchsorted(classes, labels)]
        whitening = np.linalg.cholesky(LedoitWolf().fit(centred).precision_)
        return cls(means.astype(np.float32), whitening.astype(np.float32))

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """(N,) squared Mahalanobis distance of each embedding (N, D) to its nearest class mean."""
        if not len(embeddings):
            return np.empty(0, dtype=np.float64)
        whitened = np.asarray(embeddings, dtype=np.float32) @ self.whitening
        centres, norms = self._centres
        distances = (whitened**2).sum(1)[:, None] - 2.0 * whitened @ centres.T + norms[None, :]
        return np.maximum(distances.min(axis=1), 0.0).astype(np.float64)

    @cached_property
    def _centres(self) -> tuple[np.ndarray, np.ndarray]:
        """The whitened class means (C, D) and their squared norms (C,), computed once."""
        centres = self.means @ self.whitening
        return centres, (centres**2).sum(1)

    def save(self, path: Path) -> None:
        np.savez(path, means=self.means, whitening=self.whitening)

    @classmethod
    def load(cls, path: Path) -> "Reference":
        with np.load(path) as arrays:
            return cls(arrays["means"].astype(np.float32), arrays["whitening"].astype(np.float32))


def decide(probabilities: np.ndarray, ood_score: np.ndarray, spec: AbstainSpec | None) -> Decisions:
    """The rule on N images' calibrated probabilities and OOD scores; `spec` None answers everything."""
    ood_score = np.asarray(ood_score, dtype=np.float64)
    if spec is None:
        return Decisions(ood_score, np.zeros(len(ood_score), dtype=bool), [""] * len(ood_score))
    unknown = ood_score > spec.ood_threshold
    unsure = np.asarray(probabilities).max(axis=1) < spec.confidence_threshold
    reason = [UNKNOWN if u else LOW_CONFIDENCE if c else "" for u, c in zip(unknown, unsure)]
    return Decisions(ood_score, unknown | unsure, reason)


def ood_threshold_for(val_scores: np.ndarray, keep: float) -> float:
    """The OOD threshold that keeps the fraction `keep` of the val images (their `keep` quantile)."""
    return float(np.quantile(np.asarray(val_scores, dtype=np.float64), keep, method="higher"))


@dataclass(frozen=True)
class RiskCoverage:
    """Selective prediction by confidence: accepting the images whose top probability >= threshold[i]
    keeps coverage[i] of them, with accuracy[i] on those (risk = 1 - accuracy). Thresholds descend."""

    threshold: np.ndarray
    coverage: np.ndarray
    accuracy: np.ndarray


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> RiskCoverage:
    """The curve over every distinct confidence (most confident first)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    order = np.argsort(-confidence, kind="stable")
    sorted_conf, hits = confidence[order], np.cumsum(correct[order])
    last = np.r_[np.flatnonzero(np.diff(sorted_conf) != 0), len(sorted_conf) - 1] if len(order) else np.empty(0, int)
    accepted = last + 1
    return RiskCoverage(sorted_conf[last], accepted / max(len(order), 1), hits[last] / np.maximum(accepted, 1))


def choose_confidence_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float) -> float:
    """The lowest confidence threshold whose accepted images reach `target_accuracy` (the largest coverage
    that does); when none does, the highest confidence (accept only the most confident)."""
    curve = risk_coverage(confidence, correct)
    if not len(curve.threshold):
        return 0.0
    reaching = np.flatnonzero(curve.accuracy >= target_accuracy)
    if not len(reaching):
        return float(curve.threshold[0])
    return float(curve.threshold[reaching[-1]]) if reaching[-1] < len(curve.threshold) - 1 else 0.0


class WithEmbedding(nn.Module):
    """A classifier -> (logits, embedding): the embedding is what its final classifier module
    (`get_classifier()`: timm's classifier, or a fusion head) receives, caught by a forward hook, so
    it is part of the traced graph (ONNX output `embedding`) for any backbone."""

    def __init__(self, model: nn.Module, classifier: nn.Module):
        super().__init__()
        self.model, self._caught = model, None
        classifier.register_forward_pre_hook(self._catch)

    def _catch(self, module: nn.Module, inputs: tuple) -> None:
        if self._caught is not None:  # only while this wrapper runs: the bare model keeps nothing
            self._caught.append(inputs[0])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._caught = []
        try:
            logits = self.model(images)
            return logits, self._caught[-1].flatten(1)
        finally:
            self._caught = None


def with_embedding(normalized_classifier: nn.Module) -> WithEmbedding:
    """`WithEmbedding` around a `backbones.NormalizedClassifier` (its `.model` has `get_classifier()`)."""
    return WithEmbedding(normalized_classifier, normalized_classifier.model.get_classifier())


def read_reference(folder: Path, spec: AbstainSpec) -> Reference:
    """The reference statistics of a model folder (or an export folder)."""
    return Reference.load(Path(folder) / spec.reference)
