"""One epoch of training and one pass of validation: the parts a phase trains with (`PhaseTools`: a fresh
timm optimizer and scheduler, the loss, mixup) and the parts fixed for the whole run (`Trainer`: model,
device, precision, clipping, EMA, process group)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from stages.lib.core.params import Finetune, Recipe
from stages.lib.model.backbones import apply_batchnorm_policy, block_groups, classifier_prefix
from stages.lib.training.checkpoint import TrainState
from stages.lib.training.distributed import Distributed
from stages.lib.training.loaders import Inputs


# ---------------------------------------------------------------------- recipe parts
def build_optimizer(model: nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory over the parameters that require grad (layer decay when asked)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        model, opt=recipe.opt, lr=lr, weight_decay=recipe.weight_decay, layer_decay=recipe.layer_decay
    )


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, epochs: int, lr: float, updates_per_epoch: int):
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


def build_loss(recipe: Recipe, num_classes: int):
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


@dataclass
class PhaseTools:
    """What one phase trains with: a fresh optimizer and scheduler, the loss (and mixup), the BatchNorm policy."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: Callable
    mixup: object | None
    train_bn: bool

    @classmethod
    def build(cls, model: nn.Module, recipe: Recipe, lr: float, epochs: int, updates_per_epoch: int) -> PhaseTools:
        optimizer = build_optimizer(model, recipe, lr)
        scheduler = build_scheduler(optimizer, recipe, epochs, lr, updates_per_epoch)
        loss_fn, mixup = build_loss(recipe, model.num_classes)
        return cls(optimizer, scheduler, loss_fn, mixup, recipe.train_bn)


# --------------------------------------------------------------------------- trainer
class Trainer:
    """One training run's fixed parts: model, device, precision, clipping, EMA, process group."""

    def __init__(self, model: nn.Module, settings: Finetune, mean: list[float], std: list[float], dist: Distributed):
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
        logits, labels = loader_logits(self.kept_model, loader, self.inputs, self.autocast)
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

    def state_dicts(self, step: PhaseTools) -> dict:
        """Everything a checkpoint needs to continue exactly: model, optimizer, scheduler, EMA, loss scaler."""
        return {
            "model": self.model.state_dict(),
            "optimizer": step.optimizer.state_dict(),
            "scheduler": step.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dicts(self, saved: dict) -> None:
        """The run-wide parts of a checkpoint (model, EMA, loss scaler); the phase's optimizer and scheduler
        are restored where the phase's `PhaseTools` are built."""
        self.model.load_state_dict(saved["model"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self.scaler.load_state_dict(saved["scaler"])


@torch.inference_mode()
def loader_logits(
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
