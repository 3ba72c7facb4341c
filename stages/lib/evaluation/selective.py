"""Selective prediction, reported: the risk-coverage curve on val and the abstain rule's numbers on test, once.

- `risk_coverage_outputs`: plots/evaluate/risk_coverage.csv (a DVC plot: risk = 1 - accuracy on the images
  accepted by confidence, against the share accepted) and reports/evaluate/risk_coverage.png, with the
  model's confidence threshold marked.
- `selective_report`: on a split, what the whole rule (model/abstention.py) did: coverage, accuracy on the
  accepted images, and the share abstained for each reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.model.abstention import LOW_CONFIDENCE, UNKNOWN, AbstainSpec, Decisions, risk_coverage


@dataclass(frozen=True)
class SelectiveReport:
    """The abstain rule on one split."""

    coverage: float  # images answered
    accepted_accuracy: float  # accuracy on those
    ood_rate: float  # abstained as `unknown input`
    low_confidence_rate: float  # abstained as `low confidence`
    images: int

    def headline(self) -> dict[str, float]:
        """What metrics/evaluate.json shows (the rates of each reason are in reports/evaluate/metrics.json and
        MLflow)."""
        return {key: round(getattr(self, key), 6) for key in ("coverage", "accepted_accuracy")}

    def details(self) -> dict[str, float]:
        return {key: round(value, 6) for key, value in asdict(self).items()}


def selective_report(labels: np.ndarray, probabilities: np.ndarray, decisions: Decisions) -> SelectiveReport:
    accepted = ~decisions.abstained
    correct = probabilities.argmax(1) == labels
    reasons = np.asarray(decisions.reason, dtype=object)
    return SelectiveReport(
        coverage=float(accepted.mean()) if len(labels) else 0.0,
        accepted_accuracy=float(correct[accepted].mean()) if accepted.any() else 0.0,
        ood_rate=float((reasons == UNKNOWN).mean()) if len(labels) else 0.0,
        low_confidence_rate=float((reasons == LOW_CONFIDENCE).mean()) if len(labels) else 0.0,
        images=len(labels),
    )


def risk_coverage_outputs(
    labels: np.ndarray, probabilities: np.ndarray, spec: AbstainSpec | None, plots: Path, reports: Path
) -> Path:
    """Write the val risk-coverage curve (plot CSV and figure); return the figure's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = risk_coverage(probabilities.max(1), probabilities.argmax(1) == labels)
    table = pd.DataFrame({"coverage": curve.coverage, "risk": 1.0 - curve.accuracy, "threshold": curve.threshold})
    plots.mkdir(parents=True, exist_ok=True)
    table.to_csv(plots / "risk_coverage.csv", index=False, float_format="%.6f")
    figure, axis = plt.subplots(figsize=(5.5, 4))
    axis.step(table["coverage"], table["risk"], where="post", label="accept if confidence >= threshold")
    if spec is not None:
        at = table[table["threshold"] >= spec.confidence_threshold]
        if len(at):
            point = at.iloc[-1]
            axis.scatter([point["coverage"]], [point["risk"]], color="C3", zorder=3)
            axis.annotate(
                f"threshold {spec.confidence_threshold:.3f} (target accuracy {spec.target_accuracy:.3f})",
                (point["coverage"], point["risk"]),
                textcoords="offset points",
                xytext=(-10, 10),
                ha="right",
                fontsize=8,
            )
    axis.set_xlabel("coverage (share of val images answered)")
    axis.set_ylabel("risk (error rate on the answered)")
    axis.set_title("Risk against coverage (val, by confidence)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / "risk_coverage.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
