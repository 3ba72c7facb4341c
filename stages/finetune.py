"""finetune: staged fine-tuning from the linear probe (LP-FT), phase by phase.

The model starts from the baseline's LP-FT start (stages/lib/training/lpft.py: the probe in the timm
classifier, or with `features.fusion_mode` the fusion head the features stage trained, in a
`FusedClassifier`, stages/lib/model/fusion.py). Each phase in `finetune.phases` trains the groups it names
(head, the top N timm block groups, or all) with a fresh optimizer and warmup + cosine schedule and stops
early on val loss; the last epoch's weights are kept (`finetune.keep`: or the best by val loss)
(stages/lib/training/phases.py). Then a temperature is fitted on val (NLL) and stored with the model:
served probabilities are calibrated. A checkpoint after every epoch (--checkpoints, resolved under the
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
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from stages.lib.core import threads
from stages.lib.core.metrics_io import write_metrics
from stages.lib.core.params import load_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.store import repo_root
from stages.lib.core.tracking import log_epoch, stage_run
from stages.lib.data.augmentation import train_transform
from stages.lib.data.prepared import PreparedDataset, load_meta, load_split, training_dataset
from stages.lib.data.preprocessing import for_backbone
from stages.lib.evaluation.figures import learning_curves
from stages.lib.inference.abstain_fit import fit_abstention
from stages.lib.model.card import BaselineCard, build_model, save_finetuned
from stages.lib.training import distributed
from stages.lib.training.calibration import calibrate
from stages.lib.training.checkpoint import Checkpoint
from stages.lib.training.loaders import full_val_loader, make_loaders, memory_format, uses_mixup
from stages.lib.training.lpft import fingerprint, start_from_baseline
from stages.lib.training.outcome import finetuned_card, headline, log_outcome
from stages.lib.training.phases import run_phases, write_history

log = logging.getLogger("finetune")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline's folder (the LP-FT start)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned model")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True, help="per-epoch CSV (DVC plot)")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resumable checkpoints (under the repo root)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    setup_stage(gpu=True)
    params = load_params()
    settings = params.finetune
    dist = distributed.setup()  # one process, or this process's rank under torchrun

    with stage_run("finetune", params) if dist.is_main else nullcontext():  # torchrun workers log nothing
        import mlflow

        meta = load_meta(args.prepared)
        classes = meta["classes"]
        baseline = BaselineCard.read(args.baseline)  # the backbone the features stage chose
        data_config = for_backbone(baseline.model, meta["image_size"], meta["interpolation"])  # the contract
        model = build_model(
            baseline.model, len(classes), baseline.weights, params.model.drop_rate, baseline.fusion_spec
        )
        start = start_from_baseline(model, args.baseline, baseline.fusion_spec)
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
        key = fingerprint(params, meta, start)
        checkpoint = Checkpoint(repo_root() / args.checkpoints / f"{key[:16]}.pt", key)

        started = time.perf_counter()
        on_epoch = log_epoch if dist.is_main else lambda row: None
        state = run_phases(model, settings, loaders, data_config, params.base.seed, checkpoint, on_epoch, dist)
        seconds = time.perf_counter() - started
        distributed.shutdown(dist)
        if not dist.is_main:
            return  # a torchrun worker: it trained in step with rank 0, which writes everything

        calibration = calibrate(
            model, full_val_loader(args.prepared, settings.batch_size), data_config, settings.temperature_bounds
        )
        save_finetuned(args.out, model, finetuned_card(baseline, classes, data_config, model, calibration, state))
        abstention = fit_abstention(args.out, args.prepared, params.evaluate.abstain)  # the rule the model carries
        write_history(args.history, state.history)
        write_metrics(args.metrics, headline(state))
        log_outcome(state, calibration, seconds, dist)
        mlflow.log_metrics(abstention.metrics())
        learning_curves(state.history, args.out / "learning_curves.png")
        mlflow.log_artifact(str(args.out / "learning_curves.png"))

        from stages.lib.registry.pyfunc import register_finetuned  # mlflow.pyfunc: off the --help path

        example = np.asarray(load_split(args.prepared, "val")[0][0])
        register_finetuned(args.out, example, params.mlflow.registered_model)
    checkpoint.path.unlink(missing_ok=True)
    log.info("kept epoch %d of %d (%.0f s): %s", state.kept_epoch, state.epoch, seconds, headline(state))


if __name__ == "__main__":
    main()
