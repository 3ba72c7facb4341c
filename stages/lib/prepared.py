"""The prepared cache: every split decoded and resized once, as uint8 arrays.

Layout of data/prepared/:
    <split>_images.npy   uint8 (N, H, W, 3), memory-mapped when read
    <split>_labels.npy   int64 (N,), indexes into meta.json's `classes`
    meta.json            classes, image size, the model's data config, counts
Training and evaluation read from here; no image is decoded twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def save_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    np.save(folder / f"{split}_images.npy", images)
    np.save(folder / f"{split}_labels.npy", labels.astype(np.int64))


def load_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, memory-mapped; labels int64) of one split."""
    folder = Path(folder)
    return np.load(folder / f"{split}_images.npy", mmap_mode="r"), np.load(folder / f"{split}_labels.npy")


def load_meta(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "meta.json").read_text())


def to_float_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1], channels_last memory format."""
    batch = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return batch.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)


class PreparedDataset(Dataset):
    """One split of the cache; `transform` (uint8 CHW tensor -> uint8 CHW tensor) augments per sample."""

    def __init__(self, folder: str | Path, split: str, transform=None):
        self.images, self.labels = load_split(folder, split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def normalize(images_uint8_nchw: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 NCHW -> normalised float NCHW (channels_last), as the backbone expects."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std).view(1, 3, 1, 1) * 255.0
    return ((images_uint8_nchw.float() - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
