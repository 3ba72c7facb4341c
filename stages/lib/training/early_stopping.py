"""Early stopping on the val loss, as the fine-tuning phases and the fusion head's training use it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """Stop once the val loss has not improved (strictly decreased) for `patience` epochs in a row.

    `best` and `stale` are the state to keep across a resume."""

    patience: int
    best: float = math.inf
    stale: int = 0

    def update(self, val_loss: float) -> bool:
        """Record one epoch's val loss; True when it is the best so far."""
        if val_loss < self.best:
            self.best, self.stale = val_loss, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.stale >= self.patience
