"""Where training stands (`TrainState`) and the epoch checkpoint that lets a killed run continue exactly.

The state holds one early-stopping record for the phase in progress (`stopping`) and the kept epoch
(`kept_*`: the weights the run will end with, as `finetune.keep` decides). A checkpoint is written after
every epoch; it resumes only a run of the same settings and inputs (its `fingerprint`) and format.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from stages.lib.training.early_stopping import EarlyStopping

log = logging.getLogger(__name__)
FORMAT = 2  # bump when TrainState or the checkpoint's keys change: older checkpoints then start afresh


@dataclass
class TrainState:
    """Where training stands; saved with every epoch checkpoint."""

    phase: int = 0  # index of the phase in progress
    phase_epoch: int = 0  # epochs completed in that phase
    epoch: int = 0  # epochs completed overall
    updates: int = 0  # optimizer updates overall (the EMA warmup counts these)
    # early stopping within the phase in progress: a new phase may start worse than the last one ended
    # and still improve, so each phase starts a fresh record
    stopping: EarlyStopping = field(default_factory=lambda: EarlyStopping(patience=1))
    kept_val_loss: float = math.inf  # the kept epoch's val loss
    kept_epoch: int = 0  # the epoch whose weights are kept (0: none yet)
    kept_weights: dict | None = None
    history: list[dict] = field(default_factory=list)

    def next_phase(self) -> None:
        self.phase, self.phase_epoch = self.phase + 1, 0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        return cls(**(saved | {"stopping": EarlyStopping(**saved["stopping"])}))


@dataclass(frozen=True)
class Checkpoint:
    """Where a run's epoch checkpoint lives and what it must match to be resumed (`fingerprint`)."""

    path: Path
    fingerprint: str

    def save(self, state: TrainState, parts: dict) -> None:
        """Write the state and the trainer's `parts` (`Trainer.state_dicts`) atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        torch.save({"format": FORMAT, "fingerprint": self.fingerprint, "state": state.as_dict(), **parts}, temporary)
        os.replace(temporary, self.path)  # atomic: a crash never leaves half a checkpoint

    def load(self) -> dict | None:
        """The saved checkpoint, or None when there is none or it belongs to other settings or another format."""
        if not self.path.exists():
            return None
        checkpoint = torch.load(self.path, map_location="cpu", weights_only=False)
        if checkpoint.get("fingerprint") != self.fingerprint or checkpoint.get("format") != FORMAT:
            log.info("checkpoint %s is from another configuration; starting afresh", self.path)
            return None
        return checkpoint
