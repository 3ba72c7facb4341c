"""finetune: staged fine-tuning from the linear probe (LP-FT), phase by phase.

The classifier starts as the probe from the features stage (or, with `features.fusion_mode`, the
model is a `fusion.FusedClassifier` whose fusion head starts as the one the features stage trained);
each phase in `finetune.phases` trains the groups it names (head, the top N timm block groups, or all)
with a fresh optimizer and warmup + cosine schedule, stops early on val loss; the last epoch's weights
are kept (`finetune.keep`: or the best by val loss).
After training, a temperature is fitted on val (NLL) and stored with the model: served
probabilities are calibrated. A checkpoint after every epoch (--checkpoints, resolved under the
real repository root and named by a fingerprint of the settings and inputs, so `dvc exp run
--temp/--queue` copies resume too) lets a killed run resume.
Under `torchrun --nproc_per_node=N -m stages.finetune ...` the N processes train one model
data-parallel (DDP); rank 0 alone writes the outputs and logs to MLflow.

Writes models/finetuned/ (weights; config.json with the backbone, classes, the preprocessing
contract and the temperature), metrics/finetune.json, plots/finetune_history.csv; logs the model
to MLflow and registers a version.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from stages.lib.core import threads
from stages.lib.core.digest import bytes_sha256
from stages.lib.core.errors import PipelineError
from stages.lib.core.metrics_io import write_metrics
from stages.lib.core.params import Params, load_params
from stages.lib.core.pipeline import stage_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.store import repo_root
from stages.lib.core.tracking import stage_run
from stages.lib.data.augmentation import train_transform
from stages.lib.data.prepared import PreparedDataset, load_meta, load_split, training_dataset
from stages.lib.data.preprocessing import DataConfig, for_backbone
from stages.lib.evaluation.metrics import fit_temperature, line_figure
from stages.lib.model.backbones import classifier_prefix
from stages.lib.model.card import BaselineCard, FinetunedCard, FusionSpec, build_model
from stages.lib.training import distributed
from stages.lib.training.trainer import (
    Checkpoint,
    Inputs,
    logits_of,
    make_loaders,
    memory_format,
    run_phases,
    uses_mixup,
    write_history,
)

log = logging.getLogger("finetune")


def start_from_probe(model: torch.nn.Module, head_file: Path) -> None:
    """Copy the linear probe on the pre-logits features (features' classifier.pt) into the classifier: LP-FT."""
    head = torch.load(head_file, map_location="cpu", weights_only=True)
    classifier = model.get_classifier()
    if head["weight"].shape != classifier.weight.shape:
        raise PipelineError(
            f"{head_file}: a head of shape {tuple(head['weight'].shape)} does not fit the classifier "
            f"{tuple(classifier.weight.shape)}; re-run the features stage"
        )
    with torch.no_grad():
        classifier.weight.copy_(head["weight"])
        classifier.bias.copy_(head["bias"])


def start_from_fusion_head(model: torch.nn.Module, fusion: FusionSpec, head_file: Path) -> None:
    """Load the features stage's fusion head (fusion.pt) into the `FusedClassifier`'s head: LP-FT with fusion."""
    try:
        model.head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
    except (RuntimeError, FileNotFoundError) as error:
        raise PipelineError(
            f"{head_file}: does not fit the {fusion.mode} fusion head of {fusion.stages} "
            f"stages ({str(error).splitlines()[0]}); re-run the features stage"
        ) from None


def fingerprint(params: Params, meta: dict, head_file: Path) -> str:
    """What a checkpoint must match to be resumed: the settings the stage declares in dvc.yaml, and the inputs."""
    settings = params.subset(stage_params("finetune"))
    blob = json.dumps([settings, meta], sort_keys=True).encode() + head_file.read_bytes()
    return bytes_sha256(blob)


def log_epoch(row: dict) -> None:
    """One epoch's history row as MLflow step metrics, grouped for the UI's charts: `train/*`, `val/*`,
    `lr/*` (learning rate per group; the phase is a tag of the run, its boundaries are in the history)."""
    import mlflow

    metrics = {}
    for key, value in row.items():
        if key in ("epoch", "phase", "phase_index"):
            continue
        group, _, name = key.partition("_")
        metrics[f"{group}/{name}"] = value
    mlflow.log_metrics(metrics, step=row["epoch"])


def calibrate(model: torch.nn.Module, val_loader, data_config: DataConfig, bounds) -> tuple[float, float, float]:
    """(temperature, val NLL before, after): temperature scaling fitted on the val logits within bounds."""
    device = next(model.parameters()).device
    logits, labels = logits_of(model, val_loader, Inputs(data_config.mean, data_config.std, device))
    temperature = fit_temperature(logits.numpy(), labels.numpy(), tuple(bounds))
    before = torch.nn.functional.cross_entropy(logits, labels).item()
    after = torch.nn.functional.cross_entropy(logits / temperature, labels).item()
    log.info("temperature %.3f fitted on val: NLL %.4f -> %.4f", temperature, before, after)
    return temperature, before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, required=True, help="folder with the probe head")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned model")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True, help="per-epoch CSV (DVC plot)")
    parser.add_argument(
        "--checkpoints",
        type=Path,
        required=True,
        help="folder for resumable checkpoints, relative to the repository root (not a DVC out)",
    )
    args = parser.parse_args()
    setup_stage(gpu=True)
    params = load_params()
    settings = params.finetune
    dist = distributed.setup()  # one process, or this process's rank under torchrun

    tracked = stage_run("finetune", params)
    with tracked if dist.is_main else nullcontext():  # torchrun workers log nothing
        import mlflow

        meta = load_meta(args.prepared)
        classes, size = meta["classes"], meta["image_size"]
        probe = BaselineCard.read(args.baseline)  # the backbone the features stage chose
        if dist.is_main:
            mlflow.set_tag("model.name", probe.model)
        data_config = for_backbone(probe.model, size, meta["interpolation"])  # the preprocessing contract
        # a fusion head from the features stage (features.fusion_mode)
        fusion = FusionSpec(**probe.fusion.model_dump(include={"mode", "stages", "dim"})) if probe.fusion else None
        model = build_model(probe.model, len(classes), probe.weights, params.model.drop_rate, fusion)
        if fusion:
            start = args.baseline / "fusion.pt"
            start_from_fusion_head(model, fusion, start)
        else:
            start = args.baseline / "classifier.pt"
            start_from_probe(model, start)
        model = model.to(dist.device, memory_format=memory_format(settings.channels_last))

        loaders = make_loaders(
            training_dataset(args.prepared, train_transform(params.augment)),
            PreparedDataset(args.prepared, "val"),
            settings.batch_size,
            dist,
            params.base.seed,
            threads.apply().workers(settings.workers),
            mixup=uses_mixup(settings),
        )
        started = time.perf_counter()
        key = fingerprint(params, meta, start)
        checkpoint = Checkpoint(repo_root() / args.checkpoints / f"{key[:16]}.pt", key)
        state = run_phases(
            model,
            settings,
            loaders,
            data_config,
            params.base.seed,
            checkpoint,
            on_epoch=log_epoch if dist.is_main else lambda row: None,
            dist=dist,
        )
        seconds = time.perf_counter() - started
        distributed.shutdown(dist)
        if not dist.is_main:
            return  # a torchrun worker: it trained in step with rank 0, which writes everything

        mlflow.log_params({"world_size": dist.world_size, "device": dist.device.type})
        full_val = torch.utils.data.DataLoader(PreparedDataset(args.prepared, "val"), batch_size=settings.batch_size)
        temperature, nll_before, nll_after = calibrate(model, full_val, data_config, settings.temperature_bounds)
        args.out.mkdir(parents=True, exist_ok=True)
        model = model.cpu().to(memory_format=torch.contiguous_format)
        torch.save(model.state_dict(), args.out / "model.pt")
        FinetunedCard(
            model=probe.model,
            num_classes=len(classes),
            classes=classes,
            data_config=data_config.as_dict(),
            temperature=round(temperature, 6),
            classifier=classifier_prefix(model),
            kept_epoch=state.best_epoch,
            fusion=fusion,
        ).write(args.out)
        from stages.lib.inference.abstain_fit import fit_abstention  # the abstain rule the registered model carries

        mlflow.log_metrics(fit_abstention(args.out, args.prepared, params.evaluate.abstain).metrics())
        write_history(args.history, state.history)
        best = state.history[state.best_epoch - 1]
        write_metrics(
            args.metrics,
            {
                "kept_epoch": state.best_epoch,
                "kept_val_loss": round(best["val_loss"], 6),
                "temperature": round(temperature, 4),
            },
        )
        mlflow.log_metrics(
            {
                "kept/val_accuracy": best["val_accuracy"],
                "calibration/val_nll_before": nll_before,
                "calibration/val_nll_after": nll_after,
                "time/train_seconds": round(seconds, 1),
            }
        )
        mlflow.log_param("epochs_run", state.epoch)
        phase_ends = [
            i for i, row in enumerate(state.history[:-1]) if row["phase_index"] != state.history[i + 1]["phase_index"]
        ]
        curves = args.out / "learning_curves.png"
        line_figure(
            state.history,
            "epoch",
            ["train_loss", "val_loss", "val_accuracy"],
            curves,
            "fine-tuning (dashed: phase boundaries)",
            [i + 1 for i in phase_ends],
        )
        mlflow.log_artifact(str(curves))
        from stages.lib.registry.pyfunc import register_image_classifier  # mlflow.pyfunc: off the --help path

        version, reused = register_image_classifier(
            args.out, np.asarray(load_split(args.prepared, "val")[0][0]), params.mlflow.registered_model
        )
        mlflow.set_tags(
            {
                "registered.model": params.mlflow.registered_model,
                "registered.version": version,
                "registered.reused": str(reused).lower(),
            }
        )
    checkpoint.path.unlink(missing_ok=True)
    log.info(
        "kept epoch %d: val loss %.4f, val accuracy %.4f (%.0f s)",
        state.best_epoch,
        best["val_loss"],
        best["val_accuracy"],
        seconds,
    )


if __name__ == "__main__":
    main()
