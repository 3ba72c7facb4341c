"""The online augmentation policy (torchvision v2 on uint8 tensors) and its preview grid.

Built from the `augment` params; applied per sample on the decoded cache, so augmentation
costs no decoding. Flips are off unless `hflip` > 0 (digits and text must not flip).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2


def train_transform(settings) -> v2.Compose:
    """uint8 CHW tensor -> augmented uint8 CHW tensor."""
    steps = []
    if settings.rotation or settings.translate or tuple(settings.scale) != (1.0, 1.0):
        steps.append(v2.RandomAffine(degrees=settings.rotation, translate=(settings.translate, settings.translate),
                                     scale=tuple(settings.scale), interpolation=v2.InterpolationMode.BILINEAR))
    if settings.hflip:
        steps.append(v2.RandomHorizontalFlip(p=settings.hflip))
    if settings.color_jitter:
        jitter = settings.color_jitter
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    if settings.random_erasing:
        steps.append(v2.RandomErasing(p=settings.random_erasing, value=0))
    return v2.Compose(steps) if steps else v2.Identity()  # Compose refuses an empty list


def preview_grid(images: np.ndarray, transform, count: int, path: Path, seed: int) -> None:
    """Save a grid of `count` augmented training images (uint8 NHWC in) as a PNG."""
    from PIL import Image
    from torchvision.utils import make_grid

    torch.manual_seed(seed)
    picks = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
    augmented = [transform(torch.from_numpy(np.array(images[i])).permute(2, 0, 1)) for i in sorted(picks)]
    grid = make_grid(torch.stack(augmented), nrow=int(np.ceil(np.sqrt(len(augmented)))), padding=2, pad_value=128)
    upscale = max(1, 256 // images.shape[1])
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    picture.resize((picture.width * upscale, picture.height * upscale), Image.Resampling.NEAREST).save(path)
