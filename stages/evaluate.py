"""evaluate: the test split, scored once, for reporting; the registry decision, made on val.

The linear-probe baseline (features stage) and the fine-tuned model (loaded as it is served, with
its calibration temperature) on the val and test splits (stages/lib/evaluation/report.py). Writes:
- metrics/evaluate.json: headline test numbers per model, and the fine-tuned model's val accuracy;
- reports/evaluate/: predictions.csv (every val and test image: path, label, predicted class,
  probabilities, for both models: what `make gate` compares), metrics.json (every metric, ECE before
  and after calibration, the abstain rule on test), per_class.csv, confusion matrices, reliability diagram,
  error gallery, risk-coverage curve (val), Grad-CAM overlays of the worst errors and the least confident
  correct answers (stages/lib/evaluation/heatmaps.py);
- plots/: confusion.csv, per_class_f1.csv, reliability.csv, risk_coverage.csv (DVC plots).
The registered version gets its own evaluation's tags (val score and val image digest for
promotion, test numbers for reporting, the paired comparison on val with the champion of the time),
then @champion / @challenger are settled by the val rule (stages/lib/registry/evaluation.py). Test numbers
never choose anything.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.core.arrays import softmax
from stages.lib.core.metrics_io import numeric_leaves, write_metrics
from stages.lib.core.params import load_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.tracking import stage_run
from stages.lib.evaluation.heatmaps import overlays_for
from stages.lib.evaluation.report import baseline_probabilities, evaluate_models, score_splits, write_reports
from stages.lib.inference.abstain_fit import answers_on
from stages.lib.inference.classifier import ImageClassifier
from stages.lib.model.card import BaselineCard
from stages.lib.registry.evaluation import record_in_registry

log = logging.getLogger("evaluate")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True, help="folder with val.csv, test.csv (image paths)")
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--finetuned", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for the DVC plot files")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_stage()
    params = load_params()
    settings = params.evaluate

    with stage_run("evaluate", params) as run:
        import mlflow

        baseline = BaselineCard.read(args.baseline)
        classifier = ImageClassifier.from_folder(args.finetuned, settings.batch_size)
        baseline_scores = baseline_probabilities(Path(baseline.features), args.baseline / "head.pt")
        scores = score_splits(args.prepared, args.splits, baseline_scores, lambda x: answers_on(classifier, x))
        uncalibrated = softmax(classifier.logits(scores["test"].images) * classifier.temperature)
        evaluation = evaluate_models(scores, uncalibrated, settings.top_k)
        write_metrics(args.metrics, evaluation.headline(), log_to_mlflow=False)
        mlflow.log_metrics(numeric_leaves(evaluation.results()))

        predictions = write_reports(
            args.reports,
            args.plots,
            scores,
            evaluation,
            baseline.classes,
            settings.error_gallery,
            classifier.card.abstain,
        )
        if settings.heatmaps:  # Grad-CAM on the worst errors and the least confident correct answers
            test = scores["test"]
            overlays_for(
                classifier.model,
                classifier.size,
                baseline.classes,
                test.images,
                test.labels,
                test.probabilities["finetuned"],
                settings.heatmaps,
                args.reports,
            )
        mlflow.log_artifacts(str(args.reports), artifact_path="evaluation")
        registry = record_in_registry(run, params, evaluation.results(), predictions)
        if registry:
            mlflow.set_tags({f"registry.{key}": str(value) for key, value in registry.items()})
    test = evaluation.test
    log.info(
        "test accuracy: baseline %.4f, fine-tuned %.4f (ECE %.4f, uncalibrated %.4f)",
        test["baseline"]["accuracy"],
        test["finetuned"]["accuracy"],
        test["finetuned"]["ece"],
        evaluation.calibration["fine-tuned, uncalibrated"][0],
    )


if __name__ == "__main__":
    main()
