"""The online augmentation policy (torchvision v2 on uint8 tensors) and its preview grid.

Built from the `augment` params, in timm's order: random-resized crop, flips, affine (rotation,
translation, scale), RandAugment or TrivialAugment, colour jitter, random erasing. It runs on the
decoded cache, so augmenting costs no decoding. Every image gets its own random draw, also in
`augment_batch`. Flips are off unless `hflip`/`vflip` > 0 (digits and text must not flip).
Mixup/CutMix act on labels too and belong to the trainer (finetune params), not here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from stages.lib.core.params import Augment


class RandomResizedCropSameSize:
    """RandomResizedCrop back to the input's own size: the cache is already at the model's size.

    scale: the range of the cropped area as a fraction of the image; the aspect ratio is drawn
    from (3/4, 4/3) as in torchvision and timm.
    """

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import RandomResizedCrop

        top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        return v2.functional.resized_crop(
            image,
            top,
            left,
            height,
            width,
            size=list(image.shape[-2:]),
            interpolation=v2.InterpolationMode.BILINEAR,
            antialias=True,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, ratio={self.ratio})"


def train_transform(settings: Augment) -> v2.Compose:
    """uint8 CHW tensor -> augmented uint8 CHW tensor, from the `augment` params."""
    steps = []
    if settings.crop_scale:
        steps.append(RandomResizedCropSameSize(settings.crop_scale))
    if settings.hflip:
        steps.append(v2.RandomHorizontalFlip(p=settings.hflip))
    if settings.vflip:
        steps.append(v2.RandomVerticalFlip(p=settings.vflip))
    if settings.rotation or settings.translate or tuple(settings.scale) != (1.0, 1.0):
        steps.append(
            v2.RandomAffine(
                degrees=settings.rotation,
                translate=(settings.translate, settings.translate),
                scale=tuple(settings.scale),
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    if settings.auto_augment == "randaugment":
        steps.append(v2.RandAugment(num_ops=settings.randaugment_ops, magnitude=settings.randaugment_magnitude))
    elif settings.auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    if settings.color_jitter:
        jitter = settings.color_jitter
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    if settings.random_erasing:
        steps.append(v2.RandomErasing(p=settings.random_erasing, value=0))
    return v2.Compose(steps or [v2.Identity()])  # every step off: images pass unchanged


def augment_batch(transform, images: torch.Tensor) -> torch.Tensor:
    """Apply `transform` to each image of a uint8 NCHW batch, each with its own random draw."""
    return torch.stack([transform(image) for image in images])


def preview_grid(
    images: np.ndarray, transform, count: int, path: Path, seed: int, indexes: np.ndarray | None = None
) -> None:
    """Save a grid of `count` augmented training images (uint8 NHWC in) as a PNG.

    indexes: the training index to draw from (e.g. the class-balanced one); all images when None.
    """
    from PIL import Image
    from torchvision.utils import make_grid

    torch.manual_seed(seed)
    pool = np.arange(len(images)) if indexes is None else np.asarray(indexes)
    picks = np.sort(np.random.default_rng(seed).choice(pool, size=min(count, len(pool)), replace=False))
    batch = torch.from_numpy(np.stack([np.asarray(images[i]) for i in picks])).permute(0, 3, 1, 2)
    augmented = augment_batch(transform, batch)
    grid = make_grid(augmented, nrow=int(np.ceil(np.sqrt(len(augmented)))), padding=2, pad_value=128)
    upscale = max(1, 256 // images.shape[1])
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    picture.resize((picture.width * upscale, picture.height * upscale), Image.Resampling.NEAREST).save(path)
