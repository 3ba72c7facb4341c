"""Staged fine-tuning: phases of (trainable groups, epochs, lr), each with a fresh timm optimizer
and scheduler, early stopping on val loss, the best weights restored, resumable per epoch.

Determinism: every epoch reseeds torch and the loader's shuffling from (seed, epoch), so a run
resumed from a checkpoint continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from stages.lib.backbones import apply_batchnorm_policy, set_trainable
from stages.lib.prepared import normalize

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands; saved with every epoch checkpoint."""

    phase: int = 0                  # index of the phase in progress
    phase_epoch: int = 0            # epochs completed in that phase
    epoch: int = 0                  # epochs completed overall
    stale_epochs: int = 0           # epochs since val loss last improved, in this phase
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_weights: dict | None = None
    history: list[dict] = field(default_factory=list)


def build_optimizer(model: nn.Module, phase, settings) -> torch.optim.Optimizer:
    """timm's optimizer factory over the trainable parameters (layer decay when the phase asks)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=settings.opt, lr=phase.lr, weight_decay=settings.weight_decay,
                               layer_decay=phase.layer_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, phase, updates_per_epoch: int):
    """Warmup + cosine from timm, stepped per update (`step_update`)."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=phase.epochs,
                                       warmup_epochs=phase.warmup_epochs, warmup_lr=phase.lr / 100,
                                       min_lr=phase.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    return scheduler


def loss_function(smoothing: float) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy

    return LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, num_updates: int, mean, std,
                    clip_grad: float | None, train_bn: bool, device: torch.device, desc: str) -> tuple[dict, int]:
    model.train()
    apply_batchnorm_policy(model, train_bn)
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=2):
        inputs, labels = normalize(images, mean, std).to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(inputs)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad)
        optimizer.step()
        num_updates += 1
        scheduler.step_update(num_updates=num_updates)
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return {"train_loss": total_loss / seen, "train_accuracy": correct / seen}, num_updates


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: DataLoader, mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a whole loader, model in eval mode."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            all_logits.append(model(normalize(images, mean, std).to(device)).float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate_loss(model, loader, mean, std, device) -> dict:
    """Plain cross-entropy (no smoothing) and accuracy, comparable across phases."""
    logits, labels = predict_logits(model, loader, mean, std, device)
    return {"val_loss": F.cross_entropy(logits, labels).item(), "val_accuracy": (logits.argmax(1) == labels).float().mean().item()}


def _save_checkpoint(path: Path, state: TrainState, model, optimizer, scheduler, fingerprint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"fingerprint": fingerprint, "state": state.__dict__, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, temporary)
    os.replace(temporary, path)  # atomic: a crash never leaves half a checkpoint


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("fingerprint") != fingerprint:
        log.info("checkpoint %s is from another configuration; starting afresh", path)
        return None
    return checkpoint


def run_phases(model: nn.Module, phases: list, settings, train_loader: DataLoader, val_loader: DataLoader,
               mean, std, seed: int, checkpoint_path: Path, fingerprint: str,
               on_epoch: Callable[[dict], None] = lambda row: None) -> TrainState:
    """Train phase after phase; return the final state with the best weights loaded into model.

    A checkpoint is written after every epoch; if one with the same fingerprint exists, training
    resumes after its last completed epoch.
    """
    device = next(model.parameters()).device
    loss_fn = loss_function(settings.smoothing)
    state, resumed = TrainState(), _load_checkpoint(checkpoint_path, fingerprint)
    if resumed:
        state = TrainState(**resumed["state"])
        model.load_state_dict(resumed["model"])
        log.info("resuming after epoch %d (phase %d, epoch %d of it)", state.epoch, state.phase, state.phase_epoch)
        for row in state.history:
            on_epoch(row)

    while state.phase < len(phases):
        phase = phases[state.phase]
        trainable = set_trainable(model, phase.trainable)
        optimizer = build_optimizer(model, phase, settings)
        scheduler = build_scheduler(optimizer, phase, len(train_loader))
        if resumed and state.phase_epoch > 0:
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
        resumed = None
        log.info("phase %s: %d trainable tensors, lr %g, %d epochs", phase.name, len(trainable), phase.lr, phase.epochs)
        while state.phase_epoch < phase.epochs and state.stale_epochs < settings.patience:
            torch.manual_seed(seed + state.epoch)
            train_loader.generator.manual_seed(seed + state.epoch)
            train_metrics, _ = train_one_epoch(
                model, train_loader, loss_fn, optimizer, scheduler, state.phase_epoch * len(train_loader), mean, std,
                settings.clip_grad, settings.train_bn, device, f"{phase.name} {state.phase_epoch + 1}/{phase.epochs}")
            val_metrics = evaluate_loss(model, val_loader, mean, std, device)
            state.epoch += 1
            state.phase_epoch += 1
            row = {"epoch": state.epoch, "phase": phase.name, **train_metrics, **val_metrics,
                   "lr": max(group["lr"] for group in optimizer.param_groups)}
            state.history.append(row)
            if val_metrics["val_loss"] < state.best_val_loss:
                state.best_val_loss, state.best_epoch, state.stale_epochs = val_metrics["val_loss"], state.epoch, 0
                state.best_weights = copy.deepcopy(model.state_dict())
            else:
                state.stale_epochs += 1
            log.info("epoch %d (%s): train loss %.4f acc %.4f | val loss %.4f acc %.4f", state.epoch, phase.name,
                     row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"])
            on_epoch(row)
            _save_checkpoint(checkpoint_path, state, model, optimizer, scheduler, fingerprint)
        if state.stale_epochs >= settings.patience:
            log.info("phase %s stopped early: val loss did not improve for %d epochs", phase.name, settings.patience)
        state.phase, state.phase_epoch, state.stale_epochs = state.phase + 1, 0, 0
        _save_checkpoint(checkpoint_path, state, model, optimizer, scheduler, fingerprint)

    model.load_state_dict(state.best_weights)
    return state
