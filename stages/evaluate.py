"""evaluate: the test split, scored once, for reporting; the registry decision, made on val.

The linear-probe baseline (features stage) and the fine-tuned model (loaded as it is served, with
its calibration temperature) on the val and test splits. Writes:
- metrics/evaluate.json: headline test numbers per model, and the fine-tuned model's val accuracy;
- reports/evaluate/: predictions.csv (every val and test image: path, label, predicted class,
  probabilities, for both models: what `make gate` compares), metrics.json (every metric, ECE before
  and after calibration), per_class.csv, confusion matrices, reliability diagram, error gallery;
- plots/: confusion.csv, per_class_f1.csv, reliability.csv (DVC plots).
The registered version gets its own evaluation's tags (val score and val image digest for
promotion, test numbers for reporting, the paired comparison on val with the champion of the time),
then @champion / @challenger are settled by the val rule (stages/lib/registry/aliases.py). Test numbers never
choose anything.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.lib.core.arrays import softmax
from stages.lib.core.digest import bytes_sha256
from stages.lib.core.metrics_io import numeric_leaves, write_metrics
from stages.lib.core.params import load_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.tracking import stage_run
from stages.lib.data.images import read_labelled_csv
from stages.lib.data.prepared import load_split
from stages.lib.evaluation.comparison import ComparisonError, compare, paired, predictions_frame, read_predictions
from stages.lib.evaluation.heatmaps import overlays_for
from stages.lib.evaluation.metrics import (
    classification_metrics,
    confusion_figure,
    error_gallery,
    expected_calibration_error,
    per_class_table,
    reliability_figure,
)
from stages.lib.evaluation.selective import risk_coverage_outputs, selective_report
from stages.lib.inference.abstain_fit import answers_on
from stages.lib.inference.classifier import ImageClassifier
from stages.lib.model.card import BaselineCard
from stages.lib.registry.aliases import own_evaluation, record_evaluation, settle_aliases
from stages.lib.registry.champion import evaluation_predictions, version_with_alias
from stages.lib.training.probe import probe_logits

log = logging.getLogger("evaluate")
SPLITS = ("val", "test")
PREDICTIONS = "predictions.csv"  # in --reports, also the MLflow artifact evaluation/predictions.csv


def baseline_probabilities(features_file: Path, head_file: Path) -> dict[str, np.ndarray]:
    head = torch.load(head_file, map_location="cpu", weights_only=True)
    with np.load(features_file) as arrays:
        return {
            split: softmax(probe_logits(arrays[f"{split}_x"], head["weight"].numpy(), head["bias"].numpy()))
            for split in SPLITS
        }


def images_digest(paths: list[str], labels: list[str]) -> str:
    """Identifies a set of labelled images: evaluations on the same digest are comparable."""
    lines = sorted(f"{path}\t{label}" for path, label in zip(paths, labels))
    return bytes_sha256("\n".join(lines).encode())[:16]


def champion_evidence(client, name: str, version: str, current_val: pd.DataFrame, val_digest: str) -> dict[str, str]:
    """`promotion.*` tags: this version against the champion of the time, paired on the same val images."""
    import mlflow

    found = version_with_alias(client, name)
    champion = str(found.version) if found else None
    if champion is None or champion == version:
        return {"promotion.compared_with": "none (no champion yet)"}
    tags = found.tags or {}
    if tags.get("val.images") != val_digest or "evaluation.run_id" not in tags:
        return {"promotion.compared_with": f"v{champion}: not comparable (other val images)"}
    try:
        local = evaluation_predictions(tags["evaluation.run_id"])
        labels, reference, current = paired(read_predictions(local, "val"), current_val, f"v{champion}")
    except (ComparisonError, mlflow.exceptions.MlflowException, OSError) as error:
        log.warning("no paired comparison with champion v%s: %s", champion, error)
        return {"promotion.compared_with": f"v{champion}: predictions unavailable"}
    accuracy = compare(labels, reference, current)["accuracy"]
    return {
        "promotion.compared_with": f"v{champion}",
        "promotion.val_accuracy_delta": f"{accuracy.delta:+.4f}",
        "promotion.ci95": f"[{accuracy.ci_low:+.4f}, {accuracy.ci_high:+.4f}]",
        "promotion.mcnemar_p": f"{accuracy.p_value:.4g}",
    }


def record_in_registry(run, params, results: dict, val_predictions: pd.DataFrame, val_digest: str) -> dict | None:
    """Tag the registered version with its own evaluation (once) and settle the aliases by the val rule."""
    import os

    from mlflow import MlflowClient

    settings, name, client = params.evaluate, params.mlflow.registered_model, MlflowClient()
    finetune_run = run.data.tags.get("upstream.finetune")
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{finetune_run}'") if finetune_run else []
    if not versions:
        log.warning(
            "models/finetuned was not trained in this MLflow store (no finetune run with these outputs): "
            "the registry is left as it is"
        )
        return None
    version = str(versions[0].version)
    experiment = os.environ.get("DVC_EXP_NAME", "workspace")
    if own_evaluation(client, name, version):
        finetuned = results["finetuned"]
        source = versions[0].source or ""
        model_id = getattr(versions[0], "model_id", None) or (
            source.removeprefix("models:/") if source.startswith("models:/m-") else None
        )
        if model_id:  # the logged model's page shows its test numbers too
            import mlflow

            mlflow.log_metrics({f"test.{key}": value for key, value in finetuned["test"].items()}, model_id=model_id)
        tags = {
            "evaluation.run_id": run.info.run_id,
            "evaluation.experiment": experiment,
            "git.commit": run.data.tags.get("git.commit", "unknown"),
            "data.version": run.data.tags.get("data.version", "unknown"),
            f"val.{settings.champion_metric}": f"{finetuned['val'][settings.champion_metric]:.6f}",
            "val.images": val_digest,
        }
        tags |= {f"test.{key}": f"{value:.6f}" for key, value in finetuned["test"].items()}
        tags |= champion_evidence(client, name, version, val_predictions, val_digest)
        record_evaluation(
            client,
            name,
            version,
            tags,
            (
                f"Val {settings.champion_metric} {finetuned['val'][settings.champion_metric]:.4f} (what promotion "
                f"compares). Test, reported only: accuracy {finetuned['test']['accuracy']:.4f} (linear probe "
                f"{results['baseline']['test']['accuracy']:.4f}), macro F1 {finetuned['test']['macro_f1']:.4f}, "
                f"ECE {finetuned['test']['ece']:.4f}. Trained in run {finetune_run}, evaluated in run "
                f"{run.info.run_id} ({experiment}). Input: encoded image files (column `image`); output: label, "
                "probability, probabilities, error."
            ),
        )
    else:
        log.info("version %s was evaluated before: its registry tags stay as its own evaluation wrote them", version)
    aliases = settle_aliases(client, name, settings.champion_metric, settings.min_improvement)
    return {"registered_model": name, "version": version} | aliases


def write_plots(
    folder: Path,
    classes: list[str],
    labels: np.ndarray,
    probabilities: dict[str, np.ndarray],
    per_class: pd.DataFrame,
    reliability: list[dict],
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "actual": [classes[i] for i in labels],
            "predicted": [classes[i] for i in probabilities["finetuned"].argmax(1)],
        }
    ).to_csv(folder / "confusion.csv", index=False)
    per_class[["class", "baseline_f1", "finetuned_f1"]].to_csv(
        folder / "per_class_f1.csv", index=False, float_format="%.4f"
    )
    pd.DataFrame(
        [
            {"confidence": row["confidence"], "accuracy": row["accuracy"], "perfectly calibrated": row["confidence"]}
            for row in reliability
        ]
    ).to_csv(folder / "reliability.csv", index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True, help="folder with val.csv, test.csv (image paths)")
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--finetuned", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for the DVC plot files")
    args = parser.parse_args()
    setup_stage()
    params = load_params()
    settings = params.evaluate

    with stage_run("evaluate", params) as run:
        import mlflow

        probe = BaselineCard.read(args.baseline)
        classes = probe.classes
        classifier = ImageClassifier.from_folder(args.finetuned, settings.batch_size)
        baseline = baseline_probabilities(Path(probe.features), args.baseline / "head.pt")
        data, probabilities, frames, answers = {}, {}, [], {}
        for split in SPLITS:
            images, labels = load_split(args.prepared, split)
            paths = read_labelled_csv(args.splits / f"{split}.csv")["path"].tolist()
            data[split] = (images, labels)
            answers[split] = answers_on(classifier, images)  # probabilities, and the abstain rule's decisions
            probabilities[split] = {"baseline": baseline[split], "finetuned": answers[split].probabilities}
            frames += [
                predictions_frame(split, model, paths, labels, probs, classes)
                for model, probs in probabilities[split].items()
            ]
        images, labels = data["test"]
        test = {
            model: classification_metrics(labels, probs, settings.top_k)
            for model, probs in probabilities["test"].items()
        }
        uncalibrated = softmax(classifier.logits(images) * classifier.temperature)
        calibration = {
            "fine-tuned, calibrated": expected_calibration_error(probabilities["test"]["finetuned"], labels),
            "fine-tuned, uncalibrated": expected_calibration_error(uncalibrated, labels),
            "linear probe": expected_calibration_error(probabilities["test"]["baseline"], labels),
        }
        val = classification_metrics(data["val"][1], probabilities["val"]["finetuned"], settings.top_k)
        results = {
            "baseline": {"test": test["baseline"]},
            "finetuned": {
                "test": test["finetuned"] | {"ece_uncalibrated": calibration["fine-tuned, uncalibrated"][0]},
                "val": val,
            },
        }
        headline = {
            "baseline": {"test": {k: test["baseline"][k] for k in ("accuracy", "macro_f1")}},
            "finetuned": {
                "test": {k: test["finetuned"][k] for k in ("accuracy", "macro_f1", "top_k_accuracy", "ece")},
                "val": {"accuracy": val["accuracy"]},
            },
        }
        selective = selective_report(labels, answers["test"].probabilities, answers["test"].decisions)
        headline["finetuned"]["test"]["abstain"] = selective.headline()  # coverage, accepted accuracy, OOD rate
        results["finetuned"]["test_abstain"] = selective.details()
        write_metrics(args.metrics, headline, log_to_mlflow=False)
        mlflow.log_metrics(numeric_leaves(results))

        args.reports.mkdir(parents=True, exist_ok=True)
        predictions = pd.concat(frames, ignore_index=True)
        predictions.to_csv(args.reports / PREDICTIONS, index=False)
        (args.reports / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        per_class = per_class_table(labels, {m: p.argmax(1) for m, p in probabilities["test"].items()}, classes)
        per_class.to_csv(args.reports / "per_class.csv", index=False, float_format="%.4f")
        write_plots(
            args.plots, classes, labels, probabilities["test"], per_class, calibration["fine-tuned, calibrated"][1]
        )
        reliability_figure(calibration, args.reports / "reliability.png")
        for model, probs in probabilities["test"].items():
            confusion_figure(
                labels,
                probs.argmax(1),
                classes,
                args.reports / f"confusion_{model}.png",
                f"{model}: test accuracy {test[model]['accuracy']:.4f}",
            )
        if settings.error_gallery:
            error_gallery(
                images,
                labels,
                probabilities["test"]["finetuned"],
                classes,
                settings.error_gallery,
                args.reports / "error_gallery.png",
            )
        risk_coverage_outputs(
            data["val"][1], answers["val"].probabilities, classifier.card.abstain, args.plots, args.reports
        )
        if settings.heatmaps:  # Grad-CAM on the worst errors and the least confident correct answers
            overlays_for(
                classifier.model,
                classifier.size,
                classes,
                images,
                labels,
                answers["test"].probabilities,
                settings.heatmaps,
                args.reports,
            )
        mlflow.log_artifacts(str(args.reports), artifact_path="evaluation")

        val_predictions = predictions[(predictions["split"] == "val") & (predictions["model"] == "finetuned")]
        registry = record_in_registry(
            run,
            params,
            results,
            val_predictions.set_index("path"),
            images_digest(val_predictions["path"].tolist(), val_predictions["label"].tolist()),
        )
        if registry:
            mlflow.set_tags({f"registry.{key}": str(value) for key, value in registry.items()})
    log.info(
        "test accuracy: baseline %.4f, fine-tuned %.4f (ECE %.4f, uncalibrated %.4f)",
        test["baseline"]["accuracy"],
        test["finetuned"]["accuracy"],
        test["finetuned"]["ece"],
        calibration["fine-tuned, uncalibrated"][0],
    )


if __name__ == "__main__":
    main()
