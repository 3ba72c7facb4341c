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

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from stages.lib.core.parallel import ordered_map, worker_count
from stages.lib.data.preprocessing import decode

if TYPE_CHECKING:  # torch is imported where tensors are made: the augment stage starts without it
    import torch


def save_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """One split from arrays in memory (the augment stage decodes into `create_images` instead)."""
    np.save(Path(folder) / f"{split}_images.npy", images)
    save_labels(folder, split, labels)


def create_images(folder: Path, split: str, count: int, size: int) -> np.ndarray:
    """An on-disk uint8 (count, size, size, 3) array to decode into, so a split never has to
    fit in memory. What is written is in the file (the page cache) for every reader at once; the
    kernel writes it to disk in its own time (no msync of the whole file while the stage waits)."""
    return np.lib.format.open_memmap(
        Path(folder) / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(count, size, size, 3)
    )


def decode_into(
    images: np.ndarray, paths: list[str], interpolation: str, workers: int | None = 1, chunksize: int = 16
) -> None:
    """Decode and resize each file (`preprocessing.decode`, the decoder that serving uses too) into row i of
    `images` (uint8 (N, size, size, 3), e.g. from `create_images`), spread over `workers` processes (None/0:
    every available core).

    When `images` is an .npy memmap (as `create_images` makes), each worker writes its rows into the
    file itself: decoded pixels never travel back through a pipe. Each row is written by exactly one
    worker at its own index, so the file is identical for any number of workers, and memory holds a
    bounded window of work, not the split."""
    size = images.shape[1]
    workers, file = worker_count(workers), getattr(images, "filename", None)
    progress = functools.partial(tqdm, total=len(paths), desc="decode", unit="img", mininterval=2)
    if workers > 1 and file is not None:
        write = functools.partial(_decode_row, file=str(file), size=size, interpolation=interpolation)
        for _ in progress(ordered_map(write, enumerate(paths), workers, chunksize)):
            pass
        return
    load = functools.partial(decode, size=size, interpolation=interpolation)
    for index, pixels in enumerate(progress(ordered_map(load, paths, workers, chunksize))):
        images[index] = pixels


@functools.lru_cache(maxsize=4)
def _rows_of(file: str) -> np.ndarray:
    """The .npy file as a writable memmap, opened once per worker process."""
    return np.load(file, mmap_mode="r+")


def _decode_row(item: tuple[int, str], file: str, size: int, interpolation: str) -> int:
    index, path = item
    _rows_of(file)[index] = decode(path, size, interpolation)
    return index


def save_labels(folder: Path, split: str, labels: np.ndarray) -> None:
    np.save(Path(folder) / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))


def load_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, memory-mapped; labels int64) of one split."""
    folder = Path(folder)
    return np.load(folder / f"{split}_images.npy", mmap_mode="r"), np.load(folder / f"{split}_labels.npy")


def load_meta(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "meta.json").read_text())


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


class PreparedDataset:
    """One split of the cache; `transform` (uint8 CHW tensor -> uint8 CHW tensor) augments per sample.
    A map-style dataset for torch's DataLoader (`__len__`, `__getitem__`).

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
        import torch

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
