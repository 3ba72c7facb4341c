"""The prepared cache: every split decoded and resized once, as uint8 arrays.

Layout of data/prepared/:
    <split>_images.npy   uint8 (N, H, W, 3), memory-mapped when read
    <split>_labels.npy   int64 (N,), indexes into meta.json's `classes`
    train_index.npy      int64, only with `augment.oversample`: the class-balanced training order
                         (rows of train_*.npy, smaller classes repeated)
    meta.json            classes, image size, the model's data config, counts
Training and evaluation read from here; no image is decoded twice. The trainer gets the
training set, balanced when asked, from `training_dataset(folder, transform)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def save_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """One split from arrays in memory (the augment stage decodes into `create_images` instead)."""
    np.save(Path(folder) / f"{split}_images.npy", images)
    save_labels(folder, split, labels)


def create_images(folder: Path, split: str, count: int, size: int) -> np.ndarray:
    """An on-disk uint8 (count, size, size, 3) array to decode into, so a split never has to
    fit in memory; flushed when the returned memmap is released."""
    return np.lib.format.open_memmap(Path(folder) / f"{split}_images.npy", mode="w+", dtype=np.uint8,
                                     shape=(count, size, size, 3))


def save_labels(folder: Path, split: str, labels: np.ndarray) -> None:
    np.save(Path(folder) / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))


def load_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, memory-mapped; labels int64) of one split."""
    folder = Path(folder)
    return np.load(folder / f"{split}_images.npy", mmap_mode="r"), np.load(folder / f"{split}_labels.npy")


def load_meta(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "meta.json").read_text())


def to_float_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1], channels_last memory format."""
    batch = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images  # a copy: the cache is read-only
    return batch.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)


def oversampled_index(labels: np.ndarray, seed: int) -> np.ndarray:
    """Row indexes in which every class appears as often as the largest one.

    A class with n images, against a largest class of m, is repeated m // n times in full plus
    m % n of its images drawn without replacement (seeded): every image is seen at least as often
    as before and classes are exactly even. Sorted, so the loader's shuffling alone sets the order.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    target = counts.max()
    parts = []
    for label, count in zip(classes, counts):
        rows = np.flatnonzero(labels == label)
        parts += [np.tile(rows, target // count), rng.choice(rows, size=target % count, replace=False)]
    return np.sort(np.concatenate(parts)).astype(np.int64)


def save_train_index(folder: Path, index: np.ndarray) -> None:
    np.save(Path(folder) / "train_index.npy", index.astype(np.int64))


class PreparedDataset(Dataset):
    """One split of the cache; `transform` (uint8 CHW tensor -> uint8 CHW tensor) augments per sample.

    index: rows of the split to serve, in order, repeats allowed (e.g. `oversampled_index`);
    all rows once when None.
    """

    def __init__(self, folder: str | Path, split: str, transform=None, index: np.ndarray | None = None):
        self.images, self.labels = load_split(folder, split)
        self.transform = transform
        self.index = np.arange(len(self.labels)) if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        row = int(self.index[position])
        image = torch.from_numpy(np.array(self.images[row])).permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[row])


def training_dataset(folder: str | Path, transform=None) -> PreparedDataset:
    """The train split as the trainer should see it: through the class-balanced index when the
    augment stage wrote one (`augment.oversample: true`), else every image once."""
    index_file = Path(folder) / "train_index.npy"
    index = np.load(index_file) if index_file.exists() else None
    return PreparedDataset(folder, "train", transform, index=index)
