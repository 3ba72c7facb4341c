"""export: the fine-tuned model as deployable files, each checked against PyTorch on the test split.

Writes models/export/ (model.onnx with the preprocessing in its metadata, model_fp16.onnx,
model_int8.onnx calibrated on training images, model_torchscript.pt on request, preprocessing.json;
`export.variants` picks them) and
metrics/export.json: per variant, the deterministic parity figure the gate checks (top-1
agreement with PyTorch on the test split). The rest (accuracy and its delta, max abs logit
difference, and what differs from run to run or machine to machine: file size, CPU latency per image at
the `export.latency_batches` sizes with `export.threads` threads, bounded by `export.latency_repeats`
and `latency_seconds`) goes to the MLflow run's metrics and the log only, never into a DVC-tracked
file. The parity runs use every core this process may use. The files are logged to the MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from stages.lib.core.metrics_io import numeric_leaves, write_metrics
from stages.lib.core.parallel import available_cores
from stages.lib.core.params import load_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.tracking import stage_run
from stages.lib.data.prepared import load_split

log = logging.getLogger("export")
HEADLINE = ("top1_agreement",)  # per variant, in metrics/export.json (the rest goes to MLflow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetuned", type=Path, required=True, help="folder with model.pt and config.json")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared cache (test split)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the exported files")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    setup_stage()
    params = load_params()
    settings = params.export

    with stage_run("export", params):
        import mlflow
        import numpy as np
        import torch

        # torch, timm and onnx load after the MLflow run opened: an unreachable server fails first, and --help is fast
        from stages.lib.inference.abstain import write_export_rule
        from stages.lib.inference.abstain_fit import answers_on, export_agreement
        from stages.lib.inference.classifier import ImageClassifier
        from stages.lib.inference.export import (
            export_all,
            latency_ms,
            logits_of,
            parity,
            preprocessing,
            pytorch_runner,
            runner,
            size_mb,
            state_dict_mb,
        )

        cores = available_cores()
        torch.set_num_threads(cores)  # parity runs on every core; latency at export.threads below
        classifier = ImageClassifier.from_folder(args.finetuned)
        model, size = classifier.model, classifier.size
        metadata = preprocessing(classifier.card)
        images, labels = load_split(args.prepared, "test")
        train, _ = load_split(args.prepared, "train")
        calibration = train[np.linspace(0, len(train) - 1, min(settings.calibration_images, len(train))).astype(int)]

        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        (args.out / "preprocessing.json").write_text(json.dumps(metadata, indent=2) + "\n")
        write_export_rule(args.out, args.finetuned, classifier.card)  # abstain.json + reference (docs/unknown.md)

        run_pytorch = pytorch_runner(model)
        reference = logits_of(run_pytorch, images, settings.batch_size)
        results = {
            "pytorch": {
                "accuracy": float((reference.argmax(1) == labels).mean()),
                "size_mb": round(state_dict_mb(model), 3),
            }
        }
        files = export_all(settings.variants, model, args.out, size, settings.opset, metadata, calibration)
        for variant, path in files.items():
            logits = logits_of(runner(variant, path, cores), images, settings.batch_size)
            results[variant] = parity(reference, logits, labels) | {"size_mb": round(size_mb(path), 3)}
        for variant, agreement in export_agreement(
            args.out, files, answers_on(classifier, images).decisions, images
        ).items():
            results[variant] |= agreement  # the export folder's abstain rule against PyTorch's, on test

        torch.set_num_threads(settings.threads)
        timed = {"pytorch": run_pytorch} | {
            variant: runner(variant, path, settings.threads) for variant, path in files.items()
        }
        for variant, run in timed.items():
            for batch in settings.latency_batches:
                ms, runs = latency_ms(
                    run, images, batch, settings.latency_repeats, settings.latency_seconds, settings.latency_warmup
                )
                results[variant] |= {f"latency_ms_b{batch}": round(ms, 4), f"latency_runs_b{batch}": runs}
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
