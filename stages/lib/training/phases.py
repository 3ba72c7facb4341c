"""Staged fine-tuning: the phases of `finetune.phases` in order, each with a fresh timm optimizer and
scheduler, early stopping on val loss, the kept weights decided by `finetune.keep`, resumable per epoch,
the same code on a CPU, a GPU, or N processes under torchrun (DDP).

What each phase does (tests/test_training.py checks each point):
- trains exactly the groups it names (`head`, the top N of timm's block groups, `all`): a fresh
  optimizer (`timm.optim.create_optimizer_v2`, optional layer-wise lr decay) over the parameters
  that require grad, and a fresh warmup + cosine (`sched`) scheduler stepped per update;
- keeps the BatchNorm of frozen blocks in eval mode; trainable BatchNorm updates its running
  statistics only with `train_bn`;
- label smoothing, or timm's Mixup/CutMix with soft targets; gradient clipping; optionally an EMA of
  the weights (timm's ModelEmaV3), which is then what is validated and kept, as in timm's train.py;
- stops after `patience` epochs without a new best val loss (`EarlyStopping`); the weights kept
  are the last epoch's (`keep: last`: the annealed end of the schedule) or the best epoch's by val loss
  (`keep: best_val_loss`), decided epoch by epoch by `keeps_epoch`.

Determinism: every epoch reseeds torch, numpy, random and the sampler from (seed, epoch, rank), so
the random state at an epoch follows from its number, and a run resumed from the checkpoint written
after each epoch (model, optimizer, scheduler, EMA, loss scaler, progress, kept weights) continues
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from torch import nn
from torch.utils.data import DataLoader

from stages.lib.core.params import Finetune
from stages.lib.data.preprocessing import DataConfig
from stages.lib.model.backbones import set_trainable
from stages.lib.training.checkpoint import Checkpoint, TrainState
from stages.lib.training.distributed import Distributed
from stages.lib.training.early_stopping import EarlyStopping
from stages.lib.training.loaders import seed_epoch
from stages.lib.training.loop import PhaseTools, Trainer

log = logging.getLogger(__name__)


def keeps_epoch(keep: Literal["best_val_loss", "last"], val_loss: float, kept_val_loss: float, final: bool) -> bool:
    """Whether an epoch's weights become the kept ones: under `best_val_loss` a val loss below the kept
    epoch's, under `last` the final epoch of the final phase (`final`)."""
    if keep == "best_val_loss":
        return val_loss < kept_val_loss
    return final


def run_phases(
    model: nn.Module,
    settings: Finetune,
    loaders: tuple[DataLoader, DataLoader],
    data_config: DataConfig,
    seed: int,
    checkpoint: Checkpoint,
    on_epoch: Callable[[dict], None] = lambda row: None,
    dist: Distributed | None = None,
) -> TrainState:
    """Train the phases of `settings` in order on `loaders` (train, val); return the final state, with the
    kept weights loaded into model. Inputs are normalised with `data_config`'s mean and std.

    model sits on dist.device with the LP-FT start already in its classifier. A checkpoint is written
    after every epoch (by rank 0); if one with the same fingerprint exists, training resumes after its
    last completed epoch and on_epoch is replayed for the epochs before. on_epoch gets each epoch's
    history row.
    """
    train_loader, val_loader = loaders
    dist = dist or Distributed(device=next(model.parameters()).device)
    trainer = Trainer(model, settings, data_config.mean, data_config.std, dist)
    state, resumed = TrainState(), checkpoint.load()
    if resumed:
        state = TrainState.from_dict(resumed["state"])
        trainer.load_state_dicts(resumed)
        log.info("resuming after epoch %d (phase %d, epoch %d of it)", state.epoch, state.phase, state.phase_epoch)
        for row in state.history:
            on_epoch(row)

    while state.phase < len(settings.phases):
        phase = settings.phases[state.phase]
        recipe = settings.recipe(phase)
        trainable = set_trainable(model, phase.trainable)
        net = dist.wrap(model)
        step = PhaseTools.build(model, recipe, phase.lr, phase.epochs, len(train_loader))
        if state.phase_epoch == 0:
            state.stopping = EarlyStopping(recipe.patience)
        elif resumed:  # mid-phase: the phase's optimizer and scheduler continue where they were
            step.optimizer.load_state_dict(resumed["optimizer"])
            step.scheduler.load_state_dict(resumed["scheduler"])
        resumed = None
        log.info(
            "phase %s: %d trainable tensors in %d optimizer groups, lr %g, %d epochs",
            phase.name,
            len(trainable),
            len(step.optimizer.param_groups),
            phase.lr,
            phase.epochs,
        )
        while state.phase_epoch < phase.epochs and not state.stopping.should_stop:
            seed_epoch(seed, state.epoch, dist.rank)
            train_loader.sampler.set_epoch(state.epoch)
            train_metrics = trainer.train_epoch(
                net, train_loader, step, state, f"{phase.name} {state.phase_epoch + 1}/{phase.epochs}"
            )
            val_metrics = trainer.evaluate(val_loader)
            state.epoch += 1
            state.phase_epoch += 1
            row = {
                "epoch": state.epoch,
                "phase": phase.name,
                "phase_index": state.phase,
                **{key: train_metrics.pop(key) for key in ("train_loss", "train_accuracy")},
                **val_metrics,
                **train_metrics,
            }
            state.history.append(row)
            state.stopping.update(val_metrics["val_loss"])
            final = state.phase == len(settings.phases) - 1 and state.phase_epoch == phase.epochs
            if keeps_epoch(settings.keep, val_metrics["val_loss"], state.kept_val_loss, final):
                state.kept_val_loss, state.kept_epoch = val_metrics["val_loss"], state.epoch
                state.kept_weights = trainer.kept_weights()
            log.info(
                "epoch %d (%s): train loss %.4f acc %.4f | val loss %.4f acc %.4f",
                state.epoch,
                phase.name,
                row["train_loss"],
                row["train_accuracy"],
                row["val_loss"],
                row["val_accuracy"],
            )
            on_epoch(row)
            if dist.is_main:
                checkpoint.save(state, trainer.state_dicts(step))
        if state.stopping.should_stop:
            log.info("phase %s stopped early: val loss did not improve for %d epochs", phase.name, recipe.patience)
        state.next_phase()
        if dist.is_main:
            checkpoint.save(state, trainer.state_dicts(step))

    if state.kept_weights is None:  # keep: last, and the last phase stopped early: its final epoch
        state.kept_val_loss, state.kept_epoch = state.history[-1]["val_loss"], state.epoch
        state.kept_weights = trainer.kept_weights()
    model.load_state_dict(state.kept_weights)
    return state


def write_history(path: Path, history: list[dict]) -> None:
    """The per-epoch rows as a CSV for `dvc plots` (epoch, phase, losses, accuracies, lr per group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
