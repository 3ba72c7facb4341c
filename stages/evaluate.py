"""evaluate: the linear-probe baseline and the fine-tuned model side by side on the test split.

Writes metrics/evaluate.json (per model: accuracy, balanced accuracy, macro precision/recall/F1,
top-k accuracy, log loss, ECE), plots/confusion.csv and plots/reliability.csv (DVC plots),
reports/evaluate/ (confusion matrices, per-class precision/recall/F1, reliability diagram, error
gallery) and aliases the registered model version: @challenger always, @champion when it wins
(`evaluate` params).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from stages.lib import setup_logging
from stages.lib.backbones import create_backbone
from stages.lib.metrics import (classification_metrics, confusion_figure, error_gallery,
                                expected_calibration_error, per_class_table, reliability_figure, softmax)
from stages.lib.params import load_params
from stages.lib.prepared import PreparedDataset, load_split
from stages.lib.probe import probe_logits
from stages.lib.registry import record_evaluation
from stages.lib.tracking import stage_run, write_metrics
from stages.lib.training import predict_logits

log = logging.getLogger("evaluate")


def baseline_probabilities(features_file: Path, head_file: Path) -> np.ndarray:
    embeddings = np.load(features_file)["test_x"]
    head = torch.load(head_file, map_location="cpu", weights_only=True)
    return softmax(probe_logits(embeddings, head["weight"].numpy(), head["bias"].numpy()))


def finetuned_probabilities(model_dir: Path, prepared: Path, batch_size: int) -> np.ndarray:
    config = json.loads((model_dir / "config.json").read_text())
    model = create_backbone(config["model"], "none", config["num_classes"])
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    loader = DataLoader(PreparedDataset(prepared, "test"), batch_size=batch_size)
    logits, _ = predict_logits(model, loader, config["data_config"]["mean"], config["data_config"]["std"],
                               torch.device("cpu"))
    return torch.softmax(logits, dim=1).numpy()


def description(results: dict, evaluate_run: str, finetune_run: str) -> str:
    """The registered version's description: what it scored and where that was measured."""
    finetuned, baseline = results["finetuned"], results["baseline"]
    return (f"Test split: accuracy {finetuned['accuracy']:.4f} (linear probe {baseline['accuracy']:.4f}), "
            f"macro F1 {finetuned['macro_f1']:.4f}, top-k accuracy {finetuned['top_k_accuracy']:.4f}, "
            f"log loss {finetuned['log_loss']:.4f}, ECE {finetuned['ece']:.4f}. "
            f"Trained in run {finetune_run}, evaluated in run {evaluate_run}. "
            "Input: encoded image files (column `image`); output: label, probability, probabilities, error.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--finetuned", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for confusion.csv, reliability.csv")
    args = parser.parse_args()
    setup_logging()
    params = load_params()
    settings = params.evaluate

    with stage_run("evaluate", params, ["evaluate"], upstream=["features", "finetune"]) as run:
        import mlflow

        probe = json.loads((args.baseline / "probe.json").read_text())
        classes = probe["classes"]
        images, labels = load_split(args.prepared, "test")
        probabilities = {
            "baseline": baseline_probabilities(Path(probe["features"]), args.baseline / "head.pt"),
            "finetuned": finetuned_probabilities(args.finetuned, args.prepared, settings.batch_size),
        }
        results = {name: classification_metrics(labels, probs, settings.top_k) for name, probs in probabilities.items()}
        results["gain"] = {key: results["finetuned"][key] - results["baseline"][key]
                           for key in ("accuracy", "macro_f1", "log_loss")}
        write_metrics(args.metrics, results)

        args.reports.mkdir(parents=True, exist_ok=True)
        args.plots.mkdir(parents=True, exist_ok=True)
        finetuned = probabilities["finetuned"]
        pd.DataFrame({"actual": [classes[i] for i in labels], "predicted": [classes[i] for i in finetuned.argmax(1)]}
                     ).to_csv(args.plots / "confusion.csv", index=False)
        calibration = {name: expected_calibration_error(probs, labels) for name, probs in probabilities.items()}
        pd.DataFrame(calibration["finetuned"][1]).to_csv(args.plots / "reliability.csv", index=False)
        reliability_figure(calibration, args.reports / "reliability.png")
        for name, probs in probabilities.items():
            confusion_figure(labels, probs.argmax(1), classes, args.reports / f"confusion_{name}.png",
                             f"{name}: test accuracy {results[name]['accuracy']:.4f}")
        per_class_table(labels, {name: probs.argmax(1) for name, probs in probabilities.items()}, classes
                        ).to_csv(args.reports / "per_class.csv", index=False, float_format="%.4f")
        if settings.error_gallery:
            error_gallery(images, labels, finetuned, classes, settings.error_gallery, args.reports / "error_gallery.png")
        mlflow.log_artifacts(str(args.reports), artifact_path="evaluation")

        registered = json.loads((args.finetuned / "mlflow.json").read_text())
        if registered["model_uri"].startswith("models:/m-"):  # the test metrics on the logged model's page too
            mlflow.log_metrics({f"test_{k}": v for k, v in results["finetuned"].items()},
                               model_id=registered["model_uri"].removeprefix("models:/"))
        promotion = record_evaluation(registered["registered_model"], registered["version"], results["finetuned"],
                                      settings.champion_metric, settings.min_improvement,
                                      description(results, run.info.run_id, registered["run_id"]))
        (args.reports / "registry.json").write_text(json.dumps(promotion | registered, indent=2) + "\n")
        mlflow.set_tags({"registered.version": registered["version"], "registered.champion": str(promotion["champion"])})
    log.info("test accuracy: baseline %.4f, fine-tuned %.4f", results["baseline"]["accuracy"],
             results["finetuned"]["accuracy"])


if __name__ == "__main__":
    main()
