"""uint8 pixels -> float in [0, 1], the one conversion: training, serving, export and the models' own
normalisation all go through `unit_float` (torch is imported only when a tensor is made)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def unit_float(images: "torch.Tensor") -> "torch.Tensor":
    """uint8 pixels -> float32 in [0, 1] (a new tensor; same shape and layout)."""
    return images.float().div_(255.0)


def to_float_batch(images: "np.ndarray | torch.Tensor") -> "torch.Tensor":
    """uint8 NHWC -> float NCHW in [0, 1], channels_last memory format."""
    import torch

    batch = (
        torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images
    )  # a copy: the cache is read-only
    return unit_float(batch.permute(0, 3, 1, 2)).contiguous(memory_format=torch.channels_last)


def to_float_array(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1], C-contiguous: the input of the exported models."""
    return np.ascontiguousarray(to_float_batch(images).numpy())
