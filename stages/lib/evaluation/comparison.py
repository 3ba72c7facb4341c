"""Two models on the same images: is the difference real? (The gate and registry promotion.)

`compare(labels, reference, current)` takes the predicted classes of a reference and a current
model on the same images and returns, for accuracy and macro-F1, the difference (current minus
reference), a paired bootstrap confidence interval of it (scipy.stats.bootstrap, images
resampled jointly for both models) and, for accuracy, McNemar's exact test on the images where
exactly one model is right (statsmodels). `regressed` applies the gate's rule: a drop counts only
when it is statistically significant *and* larger than a practical margin, so that one image more
or less (0.37 points of 270) never fails a build, while a real regression does.
`read_predictions` reads the per-image predictions evaluate writes (reports/evaluate/predictions.csv).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.core.errors import PipelineError

PREDICTION_COLUMNS = ["split", "model", "path", "label", "predicted", "confidence"]  # then p_<class> per class


class ComparisonError(PipelineError, ValueError):
    """The two sets of predictions cannot be compared (other images, other classes)."""


@dataclass(frozen=True)
class Difference:
    metric: str
    reference: float
    current: float
    delta: float  # current - reference
    ci_low: float  # paired bootstrap interval of delta
    ci_high: float
    p_value: float | None  # McNemar's exact test (accuracy only)
    confidence: float

    @property
    def significant(self) -> bool:
        """The interval excludes zero (and, for accuracy, McNemar agrees at the same level)."""
        outside = self.ci_high < 0 or self.ci_low > 0
        return outside and (self.p_value is None or self.p_value < 1 - self.confidence)

    def regressed(self, margin: float) -> bool:
        """A significant drop larger than `margin` (an absolute difference, e.g. 0.01 = one point)."""
        return self.significant and self.delta < -margin

    def as_dict(self) -> dict:
        return asdict(self) | {"significant": self.significant}


def _accuracy(labels, predicted, axis=-1):
    return np.mean(np.asarray(predicted) == np.asarray(labels), axis=axis)


def _macro_f1(labels, predicted, axis=-1):
    """Macro-F1 over the classes present in labels or predictions (as scikit-learn's `f1_score`),
    vectorised over leading axes so that the bootstrap's resamples are scored at once."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    scores, present = [], []
    for name in np.union1d(labels, predicted):
        true, hit = labels == name, predicted == name
        tp, errors = np.sum(true & hit, axis=axis), np.sum(true ^ hit, axis=axis)
        scores.append(np.divide(2 * tp, 2 * tp + errors, out=np.zeros(tp.shape), where=(2 * tp + errors) > 0))
        present.append((2 * tp + errors) > 0)
    return np.sum(scores, axis=0) / np.sum(present, axis=0)


def mcnemar_p_value(labels: np.ndarray, reference: np.ndarray, current: np.ndarray) -> float:
    """Exact McNemar test on the discordant pairs (one model right, the other wrong)."""
    from statsmodels.stats.contingency_tables import mcnemar

    ref_right, cur_right = reference == labels, current == labels
    table = [
        [np.sum(ref_right & cur_right), np.sum(ref_right & ~cur_right)],
        [np.sum(~ref_right & cur_right), np.sum(~ref_right & ~cur_right)],
    ]
    return float(mcnemar(table, exact=True).pvalue)


def _paired_interval(
    statistic, labels, reference, current, confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    from scipy.stats import bootstrap

    def delta(lab, ref, cur, axis=-1):
        return statistic(lab, cur, axis) - statistic(lab, ref, axis)

    if np.array_equal(reference, current):  # no discordant image: the interval is exactly zero
        return 0.0, 0.0
    result = bootstrap(
        (labels, reference, current),
        delta,
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def compare(
    labels: np.ndarray,
    reference: np.ndarray,
    current: np.ndarray,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Difference]:
    """Accuracy and macro-F1 of current vs reference on the same images (class indexes, (N,) each)."""
    labels, reference, current = (np.asarray(a) for a in (labels, reference, current))
    if not len(labels) == len(reference) == len(current):
        raise ComparisonError("labels and both predictions must cover the same images")
    accuracy = Difference(
        "accuracy",
        float(_accuracy(labels, reference)),
        float(_accuracy(labels, current)),
        float(_accuracy(labels, current) - _accuracy(labels, reference)),
        *_paired_interval(_accuracy, labels, reference, current, confidence, resamples, seed),
        mcnemar_p_value(labels, reference, current),
        confidence,
    )
    f1_ref, f1_cur = float(_macro_f1(labels, reference)), float(_macro_f1(labels, current))
    macro_f1 = Difference(
        "macro_f1",
        f1_ref,
        f1_cur,
        f1_cur - f1_ref,
        *_paired_interval(_macro_f1, labels, reference, current, confidence, resamples, seed),
        None,
        confidence,
    )
    return {"accuracy": accuracy, "macro_f1": macro_f1}


# ------------------------------------------------------------------- the predictions file
def predictions_frame(
    split: str, model: str, paths: list[str], labels: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """One row per image: split, model, path, label, predicted, confidence, p_<class> per class."""
    predicted = probabilities.argmax(axis=1)
    frame = pd.DataFrame(
        {
            "split": split,
            "model": model,
            "path": paths,
            "label": [classes[i] for i in labels],
            "predicted": [classes[i] for i in predicted],
            "confidence": probabilities.max(axis=1).round(6),
        }
    )
    return pd.concat([frame, pd.DataFrame(probabilities.round(6), columns=[f"p_{c}" for c in classes])], axis=1)


def read_predictions(source: str | Path, split: str = "test", model: str = "finetuned") -> pd.DataFrame:
    """One model's predictions on one split from a predictions CSV, indexed by path (labels as text)."""
    try:
        frame = pd.read_csv(source, dtype={"label": str, "predicted": str, "path": str}, keep_default_na=False)
    except FileNotFoundError:
        raise ComparisonError(f"{source}: no such predictions file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, IsADirectoryError) as error:
        raise ComparisonError(
            f"{source}: not a predictions file (evaluate's CSV: {', '.join(PREDICTION_COLUMNS)}, "
            f"p_<class>...): {str(error).splitlines()[0][:120]}"
        ) from None
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ComparisonError(f"{source}: not a predictions file (missing columns {missing})")
    chosen = frame[(frame["split"] == split) & (frame["model"] == model)]
    if chosen.empty:
        raise ComparisonError(f"{source}: no {model} predictions on the {split} split")
    return chosen.set_index("path")


def paired(reference: pd.DataFrame, current: pd.DataFrame, reference_name: str) -> tuple[np.ndarray, ...]:
    """(labels, reference predictions, current predictions) as class indexes, after checking that both
    frames cover the same images with the same labels; raises ComparisonError naming the difference."""
    only_ref, only_cur = reference.index.difference(current.index), current.index.difference(reference.index)
    if len(only_ref) or len(only_cur):
        raise ComparisonError(
            f"the test images differ from {reference_name}'s: {len(only_cur)} only in the current evaluation "
            f"(e.g. {list(only_cur[:2])}), {len(only_ref)} only in the reference (e.g. {list(only_ref[:2])}); "
            "compare models on the same split (same data version and split params), or refresh the reference"
        )
    reference = reference.loc[current.index]
    relabelled = current.index[reference["label"].to_numpy() != current["label"].to_numpy()]
    if len(relabelled):
        raise ComparisonError(
            f"{len(relabelled)} images have another label in {reference_name} "
            f"(e.g. {relabelled[0]}): the data changed, refresh the reference"
        )
    classes = sorted(set(current["label"]) | set(current["predicted"]) | set(reference["predicted"]))
    index = {name: i for i, name in enumerate(classes)}
    encode = lambda column: column.map(index).to_numpy()  # noqa: E731
    return encode(current["label"]), encode(reference["predicted"]), encode(current["predicted"])
