"""export: the fine-tuned model as deployable files, each checked against PyTorch on the test split.

Writes models/export/ (model.onnx with the preprocessing in its metadata, model_fp16.onnx,
model_int8.onnx calibrated on training images, model_torchscript.pt on request, preprocessing.json, the
abstain rule: abstain.json, and the int8 file's own, refitted on its outputs;
`export.variants` picks them; stages/lib/inference/export.py) and
metrics/export.json: per variant, the deterministic parity figure the gate checks (top-1
agreement with PyTorch on the test split). The rest (accuracy and its delta, max abs logit
difference, and what differs from run to run or machine to machine: file size, CPU latency per image at
the `export.latency_batches` sizes with `export.threads` threads, bounded by `export.latency_repeats`
and `latency_seconds`) goes to the MLflow run's metrics and the log only, never into a DVC-tracked
file. The parity runs use every core this process may use. The files are logged to the MLflow run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.core.metrics_io import numeric_leaves, write_metrics
from stages.lib.core.parallel import available_cores
from stages.lib.core.params import load_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.tracking import stage_run
from stages.lib.data.prepared import load_split

log = logging.getLogger("export")
HEADLINE = ("top1_agreement",)  # per variant, in metrics/export.json (the rest goes to MLflow)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetuned", type=Path, required=True, help="folder with model.pt and config.json")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared cache (test split)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the exported files")
    parser.add_argument("--metrics", type=Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_stage()
    params = load_params()
    settings = params.export

    with stage_run("export", params):
        import mlflow
        import torch

        # torch, timm and onnx load after the MLflow run opened: an unreachable server fails first, and --help is fast
        from stages.lib.inference.abstain import write_export_rule
        from stages.lib.inference.abstain_fit import answers_on, export_agreement, fit_own_rules
        from stages.lib.inference.classifier import ImageClassifier
        from stages.lib.inference.export import export_and_check, time_variants

        cores = available_cores()
        torch.set_num_threads(cores)  # parity runs on every core; latency at export.threads
        classifier = ImageClassifier.from_folder(args.finetuned)
        test, train = load_split(args.prepared, "test"), load_split(args.prepared, "train")
        results, files = export_and_check(args.out, classifier, settings, test, train[0], cores)
        write_export_rule(args.out, args.finetuned, classifier.card)  # abstain.json + reference (docs/unknown.md)
        fit_own_rules(args.out, files, classifier.card.abstain, train, load_split(args.prepared, "val"))  # int8's
        decisions = answers_on(classifier, test[0]).decisions
        for variant, agreement in export_agreement(args.out, files, decisions, test[0]).items():
            results[variant] |= agreement  # the export folder's abstain rule against PyTorch's, on test
        for variant, timings in time_variants(classifier.model, files, test[0], settings).items():
            results[variant] |= timings
            log.info("%s: %s", variant, ", ".join(f"{k} {v:.4g}" for k, v in results[variant].items()))
        write_metrics(
            args.metrics,
            {variant: {key: results[variant][key] for key in HEADLINE} for variant in settings.variants},
            log_to_mlflow=False,
        )
        mlflow.log_metrics(numeric_leaves(results))  # everything, timings and sizes included
        mlflow.log_artifacts(str(args.out), artifact_path="export")
    log.info("exported %s to %s", ", ".join(settings.variants), args.out)


if __name__ == "__main__":
    main()
