"""What the trainer reads: the train and val loaders of one process, the per-epoch seeding, and the
uint8 -> normalised float step on the device (the deployed model's own normalisation)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from stages.lib.core.errors import PipelineError
from stages.lib.core.params import Finetune
from stages.lib.data.prepared import PreparedDataset
from stages.lib.model.backbones import Normalize
from stages.lib.training.distributed import Distributed


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
    in strided shards without padding; the trainer sums over the shards. mixup: timm's Mixup mixes
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


def full_val_loader(prepared, batch_size: int) -> DataLoader:
    """The whole val split of the prepared cache, in order, in one process (what calibration fits on)."""
    return DataLoader(PreparedDataset(prepared, "val"), batch_size=batch_size)


def uses_mixup(settings: Finetune) -> bool:
    """Whether any phase of the finetune settings mixes images (mixup or cutmix)."""
    return any(settings.recipe(phase).mixes for phase in settings.phases)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """torch, numpy and random seeded from (seed, epoch, rank): augmentation, dropout, mixup."""
    from timm.utils import random_seed

    random_seed(seed + epoch, rank=10_000 * rank)


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
