"""Staged fine-tuning: phases of (trainable groups, epochs, lr, recipe), each with a fresh timm
optimizer and scheduler, early stopping on val loss, the best weights restored, resumable per epoch,
the same code on a CPU, a GPU, or N processes under torchrun (DDP).

What each phase does (tests/test_training.py checks each point):
- trains exactly the groups it names (`head`, the top N of timm's block groups, `all`): a fresh
  optimizer (`timm.optim.create_optimizer_v2`, optional layer-wise lr decay) over the parameters
  that require grad, and a fresh warmup + cosine (`sched`) scheduler stepped per update;
- keeps the BatchNorm of frozen blocks in eval mode; trainable BatchNorm updates its running
  statistics only with `train_bn`;
- label smoothing, or timm's Mixup/CutMix with soft targets; gradient clipping; optionally an EMA of
  the weights (timm's ModelEmaV3), which is then what is validated and kept, as in timm's train.py;
- stops after `patience` epochs without a new best val loss; at the end the last epoch's weights are kept
  (`keep: last`: the annealed end of the schedule), or the best epoch's by val loss restored (`keep: best_val_loss`).

Determinism: every epoch reseeds torch, numpy, random and the sampler from (seed, epoch, rank), so
the random state at an epoch follows from its number, and a run resumed from the checkpoint written
after each epoch (model, optimizer, scheduler, EMA, loss scaler, progress, best weights) continues
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from stages.lib.core.errors import PipelineError
from stages.lib.data.preprocessing import DataConfig
from stages.lib.model.backbones import Normalize, apply_batchnorm_policy, block_groups, classifier_prefix, set_trainable
from stages.lib.training.distributed import Distributed
from stages.lib.training.early_stopping import EarlyStopping

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands; saved with every epoch checkpoint."""

    phase: int = 0  # index of the phase in progress
    phase_epoch: int = 0  # epochs completed in that phase
    epoch: int = 0  # epochs completed overall
    updates: int = 0  # optimizer updates overall (the EMA warmup counts these)
    stale_epochs: int = 0  # epochs since this phase's best val loss
    phase_best_val_loss: float = math.inf  # early stopping compares within the phase: a new phase
    # may start worse than the last one ended and still improve
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_weights: dict | None = None
    history: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------- data
def make_loaders(
    train_set: Dataset,
    val_set: Dataset,
    batch_size: int,
    dist: Distributed,
    seed: int,
    workers: int = 0,
    mixup: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders for this process.

    batch_size is global: each of the world_size processes loads batch_size / world_size. Training
    order comes from a DistributedSampler (also with one process) reseeded per epoch
    (`sampler.set_epoch`), so N processes together see the batches one process would. Val is split
    in strided shards without padding; `evaluate` sums over the shards. mixup: timm's Mixup mixes
    pairs, so batches must be even and the last incomplete batch is dropped.
    """
    per_process = batch_size // dist.world_size
    if batch_size % dist.world_size:
        raise PipelineError(f"finetune.batch_size: {batch_size} does not split over {dist.world_size} processes")
    if mixup and per_process % 2:
        raise PipelineError(
            f"finetune.batch_size: mixup/cutmix mix pairs, so each process needs an even batch (got {per_process})"
        )
    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    pin = dist.device.type == "cuda"
    train = DataLoader(
        train_set,
        batch_size=per_process,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        drop_last=mixup and len(sampler) >= per_process,
    )
    shard = Subset(val_set, range(dist.rank, len(val_set), dist.world_size))
    val = DataLoader(shard, batch_size=per_process * 2, num_workers=workers, pin_memory=pin)
    return train, val


def uses_mixup(settings) -> bool:
    """Whether any phase of the finetune settings mixes images (mixup or cutmix)."""
    return any(settings.recipe(phase).mixes for phase in settings.phases)


def write_history(path: Path, history: list[dict]) -> None:
    """The per-epoch rows as a CSV for `dvc plots` (epoch, phase, losses, accuracies, lr per group)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


class Inputs:
    """uint8 NCHW batches -> normalised float on the device (channels_last when asked)."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool = True):
        self.normalize = Normalize(mean, std).to(device)  # the deployed model's own normalisation
        self.device = device
        self.memory_format = memory_format(channels_last)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """torch, numpy and random seeded from (seed, epoch, rank): augmentation, dropout, mixup."""
    from timm.utils import random_seed

    random_seed(seed + epoch, rank=10_000 * rank)


# ---------------------------------------------------------------------- recipe parts
def build_optimizer(model: nn.Module, recipe, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory over the parameters that require grad (layer decay when asked)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        model, opt=recipe.opt, lr=lr, weight_decay=recipe.weight_decay, layer_decay=recipe.layer_decay
    )


def build_scheduler(optimizer: torch.optim.Optimizer, recipe, epochs: int, lr: float, updates_per_epoch: int):
    """timm's scheduler (`recipe.sched`, warmup from lr/100), stepped per update (`step_update`)."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=recipe.sched,
        num_epochs=epochs,
        warmup_epochs=recipe.warmup_epochs,
        warmup_lr=lr / 100,
        min_lr=recipe.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def build_loss(recipe, num_classes: int):
    """(loss function, timm Mixup or None): soft-target CE under mixup/cutmix, else label smoothing."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if recipe.mixes:
        mixup = Mixup(
            mixup_alpha=recipe.mixup_alpha,
            cutmix_alpha=recipe.cutmix_alpha,
            label_smoothing=recipe.smoothing,
            num_classes=num_classes,
        )
        return SoftTargetCrossEntropy(), mixup
    if recipe.smoothing > 0:
        return LabelSmoothingCrossEntropy(recipe.smoothing), None
    return nn.CrossEntropyLoss(), None


def lr_labels(model: nn.Module) -> dict[str, list[str]]:
    """History column -> parameter names: `lr_head` for the classifier, `lr_top1`, `lr_top2`, ... for
    timm's block groups counted from the top, as `trainable: N` counts them."""
    head = classifier_prefix(model)
    labels = {"lr_head": [name for name, _ in model.named_parameters() if name.startswith(head)]}
    for rank, names in enumerate(reversed(block_groups(model)), start=1):
        labels[f"lr_top{rank}"] = names
    return labels


# --------------------------------------------------------------------------- trainer
@dataclass
class PhaseTools:
    """What one phase trains with: a fresh optimizer and scheduler, the loss (and mixup), the BatchNorm policy."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: Callable
    mixup: object | None
    train_bn: bool

    @classmethod
    def build(cls, model: nn.Module, recipe, lr: float, epochs: int, updates_per_epoch: int) -> PhaseTools:
        optimizer = build_optimizer(model, recipe, lr)
        scheduler = build_scheduler(optimizer, recipe, epochs, lr, updates_per_epoch)
        loss_fn, mixup = build_loss(recipe, model.num_classes)
        return cls(optimizer, scheduler, loss_fn, mixup, recipe.train_bn)


class Trainer:
    """One training run's fixed parts: model, device, precision, clipping, EMA, process group."""

    def __init__(self, model: nn.Module, settings, mean, std, dist: Distributed):
        self.model, self.settings, self.dist = model, settings, dist
        self.device = dist.device
        self.inputs = Inputs(mean, std, self.device, settings.channels_last)
        cuda_amp = self.device.type == "cuda" and settings.amp
        self.amp_dtype = getattr(torch, settings.amp_dtype) if cuda_amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if settings.model_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=settings.model_ema_decay, use_warmup=settings.model_ema_warmup)
        self.lr_columns = lr_labels(model)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_epoch(self, net: nn.Module, loader: DataLoader, step: PhaseTools, state: TrainState, desc: str) -> dict:
        """One pass over loader; returns train loss/accuracy (summed over processes) and lr per group.

        net is the model or its DDP wrapper; the scheduler's position is this phase's updates so far
        (`state.phase_epoch` epochs of `len(loader)`). Accuracy under mixup is against the unmixed labels.
        """
        optimizer, scheduler, loss_fn, mixup = step.optimizer, step.scheduler, step.loss_fn, step.mixup
        first_update = state.phase_epoch * len(loader)
        net.train()
        apply_batchnorm_policy(self.model, step.train_bn)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # summed on the device: reading them per step (.item()) would wait for the GPU every step
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen, steps = 0, 0
        lr_sums = [0.0] * len(optimizer.param_groups)
        bar = tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=2, disable=not self.dist.is_main)
        for images, labels in bar:
            inputs, labels = self.inputs(images), labels.to(self.device, non_blocking=True)
            targets = labels
            if mixup is not None:
                inputs, targets = mixup(inputs, labels)
            with self.autocast():
                logits = net(inputs)
                loss = loss_fn(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.settings.clip_grad:
                self.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trainable, self.settings.clip_grad)
            lr_sums = [total + group["lr"] for total, group in zip(lr_sums, optimizer.param_groups)]
            self.scaler.step(optimizer)
            self.scaler.update()
            steps += 1
            state.updates += 1
            scheduler.step_update(num_updates=first_update + steps)
            if self.ema is not None:
                self.ema.update(self.model, step=state.updates)
            total_loss += loss.detach().double() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
        total_loss, correct, seen = self.dist.sum([total_loss.item(), correct.item(), seen])
        return {
            "train_loss": total_loss / seen,
            "train_accuracy": correct / seen,
            **self._lr_per_group(optimizer, [total / max(steps, 1) for total in lr_sums]),
        }

    def _lr_per_group(self, optimizer, group_lrs: list[float]) -> dict[str, float]:
        """Mean lr over the epoch of each block group (0 when frozen): the phases show in the plot."""
        lr_of = {id(p): lr for group, lr in zip(optimizer.param_groups, group_lrs) for p in group["params"]}
        named = dict(self.model.named_parameters())
        return {
            column: max(lr_of.get(id(named[name]), 0.0) for name in names) for column, names in self.lr_columns.items()
        }

    def evaluate(self, loader: DataLoader) -> dict:
        """Plain cross-entropy (no smoothing) and accuracy of the kept weights (the EMA when on)."""
        logits, labels = logits_of(self.kept_model, loader, self.inputs, self.autocast)
        loss_sum = F.cross_entropy(logits, labels, reduction="sum").item()
        correct = (logits.argmax(1) == labels).sum().item()
        loss_sum, correct, count = self.dist.sum([loss_sum, correct, len(labels)])
        return {"val_loss": loss_sum / count, "val_accuracy": correct / count}

    @property
    def kept_model(self) -> nn.Module:
        """What is validated and kept: the EMA of the weights when on, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def kept_weights(self) -> dict:
        return {key: value.detach().cpu().clone() for key, value in self.kept_model.state_dict().items()}


@torch.inference_mode()
def logits_of(
    model: nn.Module, loader: DataLoader, inputs: Inputs, autocast: Callable = nullcontext
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float logits on the CPU, labels) of a whole loader, model in eval mode."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        with autocast():
            all_logits.append(model(inputs(images)).float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def predict_logits(
    model: nn.Module, loader: DataLoader, mean, std, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a loader of uint8 images, normalised with mean and std (lists)."""
    return logits_of(model, loader, Inputs(mean, std, device))


# ------------------------------------------------------------------------ checkpoints
@dataclass(frozen=True)
class Checkpoint:
    """Where a run's epoch checkpoint lives and what it must match to be resumed (`fingerprint`)."""

    path: Path
    fingerprint: str

    def save(self, state: TrainState, trainer: Trainer, step: PhaseTools) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        torch.save(
            {
                "fingerprint": self.fingerprint,
                "state": state.__dict__,
                "model": trainer.model.state_dict(),
                "optimizer": step.optimizer.state_dict(),
                "scheduler": step.scheduler.state_dict(),
                "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
                "scaler": trainer.scaler.state_dict(),
            },
            temporary,
        )
        os.replace(temporary, self.path)  # atomic: a crash never leaves half a checkpoint

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        checkpoint = torch.load(self.path, map_location="cpu", weights_only=False)
        if checkpoint.get("fingerprint") != self.fingerprint:
            log.info("checkpoint %s is from another configuration; starting afresh", self.path)
            return None
        return checkpoint


# ----------------------------------------------------------------------------- phases
def run_phases(
    model: nn.Module,
    settings,
    loaders: tuple[DataLoader, DataLoader],
    data_config: DataConfig,
    seed: int,
    checkpoint: Checkpoint,
    on_epoch: Callable[[dict], None] = lambda row: None,
    dist: Distributed | None = None,
) -> TrainState:
    """Train the phases of `settings` (the finetune params) in order on `loaders` (train, val); return the
    final state, with the kept weights (`settings.keep`: the best epoch by val loss, or the last) loaded
    into model. Inputs are normalised with `data_config`'s mean and std.

    model sits on dist.device with the probe already in its classifier (LP-FT). A checkpoint is
    written after every epoch (by rank 0); if one with the same fingerprint exists, training resumes
    after its last completed epoch and on_epoch is replayed for the epochs before. on_epoch gets each
    epoch's history row.
    """
    train_loader, val_loader = loaders
    dist = dist or Distributed(device=next(model.parameters()).device)
    trainer = Trainer(model, settings, data_config.mean, data_config.std, dist)
    state, resumed = TrainState(), checkpoint.load()
    if resumed:
        state = TrainState(**resumed["state"])
        model.load_state_dict(resumed["model"])
        if trainer.ema is not None:
            trainer.ema.load_state_dict(resumed["ema"])
        trainer.scaler.load_state_dict(resumed["scaler"])
        log.info("resuming after epoch %d (phase %d, epoch %d of it)", state.epoch, state.phase, state.phase_epoch)
        for row in state.history:
            on_epoch(row)

    while state.phase < len(settings.phases):
        phase = settings.phases[state.phase]
        recipe = settings.recipe(phase)
        trainable = set_trainable(model, phase.trainable)
        net = dist.wrap(model)
        step = PhaseTools.build(model, recipe, phase.lr, phase.epochs, len(train_loader))
        if resumed and state.phase_epoch > 0:
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
        stopper = EarlyStopping(recipe.patience, state.phase_best_val_loss, state.stale_epochs)
        while state.phase_epoch < phase.epochs and not stopper.should_stop:
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
            stopper.update(val_metrics["val_loss"])
            state.phase_best_val_loss, state.stale_epochs = stopper.best, stopper.stale
            last = state.phase == len(settings.phases) - 1 and state.phase_epoch == phase.epochs
            if val_metrics["val_loss"] < state.best_val_loss if settings.keep == "best_val_loss" else last:
                state.best_val_loss, state.best_epoch = val_metrics["val_loss"], state.epoch  # the weights kept
                state.best_weights = trainer.kept_weights()
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
                checkpoint.save(state, trainer, step)
        if stopper.should_stop:
            log.info("phase %s stopped early: val loss did not improve for %d epochs", phase.name, recipe.patience)
        state.phase, state.phase_epoch, state.stale_epochs, state.phase_best_val_loss = state.phase + 1, 0, 0, math.inf
        if dist.is_main:
            checkpoint.save(state, trainer, step)

    if state.best_weights is None:  # keep: last, and the last phase stopped early: its final epoch
        state.best_val_loss, state.best_epoch = state.history[-1]["val_loss"], state.epoch
        state.best_weights = trainer.kept_weights()
    model.load_state_dict(state.best_weights)
    return state
