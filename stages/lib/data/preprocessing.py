"""The preprocessing contract: one description of how an image becomes the model's input.

`DataConfig` holds the decisions: input size, resize filter, mean and std, with one crop rule
(shorter side resized to the size, centre crop). The prepared cache fixes size and filter (augment,
from `model.image_size` and `model.interpolation`, recorded in data/prepared/meta.json); the chosen
backbone's pretrained config fixes mean and std (`for_backbone`). finetune writes the result into
the model folder's config.json (`data_config`), and every consumer reads it from there: evaluate,
export (also as ONNX metadata), predict, the MLflow pyfunc and `mlflow models serve`.

- `decode(source, size, interpolation)`: an image file (path or file object) -> uint8 (size, size, 3),
  upright RGB: the one decoder, for the cache (augment) and for encoded files (serving).

Torch-free: the network-side half of the contract (`(x / 255 - mean) / std`) is
`stages.lib.model.backbones.Normalize`, inside every model's graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from stages.lib.core.errors import PipelineError
from stages.lib.data.images import load_rgb

INTERPOLATIONS = {  # timm's names -> Pillow's filters
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def resample_filter(interpolation: str) -> Image.Resampling:
    """A resize filter by timm's name; an unknown name is an error, never a silent default."""
    try:
        return INTERPOLATIONS[interpolation]
    except KeyError:
        raise PipelineError(f"unknown interpolation '{interpolation}' (one of: {', '.join(INTERPOLATIONS)})") from None


def decode(source, size: int, interpolation: str) -> np.ndarray:
    """An image file (path or binary file object) -> uint8 (size, size, 3), prepared as for training."""
    return load_rgb(source, size, resample_filter(interpolation))


@dataclass(frozen=True)
class DataConfig:
    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        resample_filter(self.interpolation)  # fail at construction on an unknown filter

    def as_dict(self) -> dict:
        """The form written to config.json (timm's key names)."""
        return {
            "input_size": [3, self.size, self.size],
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop": "center",
        }

    @classmethod
    def from_dict(cls, values: dict, source: str = "config.json") -> "DataConfig":
        try:
            return cls(
                int(values["input_size"][-1]), values["interpolation"], tuple(values["mean"]), tuple(values["std"])
            )
        except (KeyError, TypeError, IndexError) as error:
            raise PipelineError(f"{source}: data_config lacks {error} (input_size, interpolation, mean, std)") from None

    def decode(self, source) -> np.ndarray:
        return decode(source, self.size, self.interpolation)


def for_backbone(name: str, size: int, interpolation: str) -> DataConfig:
    """The contract for backbone `name` on the prepared cache: its pretrained mean and std, the cache's
    size and filter (never timm's default filter: the model is served as it was trained)."""
    import timm

    pretrained = timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False))
    return DataConfig(size, interpolation, tuple(pretrained["mean"]), tuple(pretrained["std"]))
