"""export: the fine-tuned model as deployable files, each checked against PyTorch on the test split.

Writes models/export/ (model.onnx with the preprocessing in its metadata, model_fp16.onnx,
model_int8.onnx, model_torchscript.pt, preprocessing.json; `export.variants` picks them) and
metrics/export.json: per variant, parity with PyTorch (max abs logit difference, top-1 agreement,
accuracy and its delta), file size and CPU latency per image at the `export.latency_batches`
sizes. The files are logged to the MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

from stages.lib import setup_logging
from stages.lib.export import (export_all, latency_ms, logits_of, parity, preprocessing, pytorch_runner, runner,
                               size_mb, state_dict_mb)
from stages.lib.params import load_params
from stages.lib.prepared import load_split
from stages.lib.serving import ImageClassifier
from stages.lib.tracking import stage_run, write_metrics

log = logging.getLogger("export")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetuned", type=Path, required=True, help="folder with model.pt and config.json")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared cache (test split)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the exported files")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    setup_logging()
    params = load_params()
    settings = params.export

    with stage_run("export", params, ["export"]):
        import mlflow

        torch.set_num_threads(settings.threads)
        classifier = ImageClassifier.from_folder(args.finetuned)
        model, size = classifier.model, classifier.size
        metadata = preprocessing(classifier.config)
        images, labels = load_split(args.prepared, "test")

        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        (args.out / "preprocessing.json").write_text(json.dumps(metadata, indent=2) + "\n")

        def timings(run) -> dict[str, float]:
            return {f"latency_ms_b{batch}": round(latency_ms(run, images, batch, settings.latency_repeats), 4)
                    for batch in settings.latency_batches}

        run_pytorch = pytorch_runner(model)
        reference = logits_of(run_pytorch, images, settings.batch_size)
        results = {"pytorch": {"accuracy": float((reference.argmax(1) == labels).mean()),
                               "size_mb": round(state_dict_mb(model), 3)} | timings(run_pytorch)}
        files = export_all(settings.variants, model, args.out, size, settings.opset, metadata)
        for variant, path in files.items():
            run = runner(variant, path, settings.threads)
            results[variant] = (parity(reference, logits_of(run, images, settings.batch_size), labels)
                                | {"size_mb": round(size_mb(path), 3)} | timings(run))
            log.info("%s: %s", variant, ", ".join(f"{k} {v:.4g}" for k, v in results[variant].items()))
        write_metrics(args.metrics, results)
        mlflow.log_artifacts(str(args.out), artifact_path="export")
    log.info("exported %s to %s", ", ".join(settings.variants), args.out)


if __name__ == "__main__":
    main()
