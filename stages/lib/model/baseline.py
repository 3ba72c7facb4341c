"""The baseline's linear heads: a probe on embeddings as a plain linear map, saved as a torch file of
`weight` (classes x features) and `bias`, read and written only here.

The features stage writes two into the baseline's folder: `head.pt` (the chosen backbone's probe on its
cached embeddings: the baseline evaluate reports) and `classifier.pt` (a probe on the pre-logits columns
only: the LP-FT start of the timm classifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.lib.core.errors import PipelineError


@dataclass(frozen=True)
class LinearHead:
    """logits = embeddings @ weight.T + bias (float32 arrays)."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return embeddings @ self.weight.T + self.bias


def save_linear_head(head: LinearHead, path: Path) -> None:
    torch.save({"weight": torch.from_numpy(head.weight), "bias": torch.from_numpy(head.bias)}, path)


def load_linear_head(path: Path) -> LinearHead:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; re-run the features stage") from None
    return LinearHead(saved["weight"].numpy(), saved["bias"].numpy())
