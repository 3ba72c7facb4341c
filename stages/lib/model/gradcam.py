"""Grad-CAM heatmaps (pytorch-grad-cam) of a classifier, with the target layer chosen by code.

- `target_layer(model, size)`: which layer to explain, for any timm backbone and the fused heads, from one
  forward pass with hooks: of the backbone's feature-stage outputs (timm's `feature_info`) and its last
  spatial layer, the deepest whose map (N, C, H, W) is at least `MIN_SIDE` cells on a side, so small inputs
  are not explained on a 1x1 or 2x2 grid (at 224 px a CNN's final 7x7 map; at the demo's 80 px the 5x5
  output of the stride-16 stage). Token models (ViT and
  kin: (N, tokens, C)) get the input norm of their last block, its patch tokens reshaped to their grid.
- `heatmaps(model, images, classes)`: (N, H, W) in [0, 1], each image's evidence for the given class.
- `blend`: an image with its heatmap laid over it. Figures: evaluation/heatmaps.py (evaluate) and
  inference/explain.py (`stages.predict --explain`).

What a heatmap shows: where, in the chosen layer's grid, the activations raised the predicted class's score
(positive gradient-weighted evidence). It does not show what the model saw there, nor evidence against it,
and at a coarse grid it is coarse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from stages.lib.data.pixels import to_float_batch

MIN_SIDE = 4  # cells on a side of the explained layer's map


@dataclass(frozen=True)
class TargetLayer:
    """The layer Grad-CAM explains: its name in the model, the module, its map side, and for token
    models how to turn tokens into a (N, C, side, side) map."""

    name: str
    module: nn.Module = field(repr=False)
    side: int
    prefix_tokens: int | None = None  # None: a (N, C, H, W) map

    def reshape(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.prefix_tokens is None:
            return tensor
        tokens = tensor[:, self.prefix_tokens :, :]
        return tokens.reshape(tokens.shape[0], self.side, self.side, tokens.shape[2]).permute(0, 3, 1, 2)


def _outputs_in_order(model: nn.Module, size: int) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, output shape) of every module, in the order their forward passes finish."""
    seen, handles = [], []
    for name, module in model.named_modules():
        if name:
            handles.append(
                module.register_forward_hook(
                    lambda m, i, out, name=name: (
                        seen.append((name, m, tuple(out.shape))) if isinstance(out, torch.Tensor) else None
                    )
                )
            )
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _prefix_tokens(model: nn.Module) -> int:
    for module in model.modules():
        if hasattr(module, "num_prefix_tokens"):
            return int(module.num_prefix_tokens)
    return 0


def _stage_outputs(model: nn.Module) -> set[str] | None:
    """Full names of the modules whose outputs are the timm backbone's feature stages (`feature_info`), or
    None when the model holds no timm backbone that lists them."""
    for prefix, module in model.named_modules():
        info = getattr(module, "feature_info", None)
        if isinstance(info, list) and info and all(isinstance(entry, dict) and "module" in entry for entry in info):
            return {f"{prefix}.{entry['module']}" if prefix else entry["module"] for entry in info}
    return None


def target_layer(model: nn.Module, size: int) -> TargetLayer:
    """The layer to explain in `model` (images (N, 3, size, size) -> logits); see the module docstring."""
    outputs = _outputs_in_order(model, size)
    maps = [(name, module, shape[2]) for name, module, shape in outputs if len(shape) == 4 and 1 < shape[2] == shape[3]]
    stages = _stage_outputs(model)
    if maps and (stages is None or any(entry[0] in stages for entry in maps)):
        # the backbone's stage outputs, and its last spatial layer (a CNN's final conv after the last stage)
        maps = [entry for entry in maps if stages is None or entry[0] in stages] + [maps[-1]]
        wide = [entry for entry in maps if entry[2] >= MIN_SIDE]
        name, module, side = wide[-1] if wide else max(maps, key=lambda entry: entry[2])
        return TargetLayer(name, module, side)
    prefix = _prefix_tokens(model)
    grids = []
    for name, module, shape in outputs:
        if len(shape) == 3 and shape[1] > prefix:
            side = int(round((shape[1] - prefix) ** 0.5))
            if side > 1 and side * side == shape[1] - prefix:
                grids.append((name, module, side))
    if not grids:
        raise ValueError(f"{type(model).__name__}: no layer with a spatial map or a grid of tokens to explain")
    norms = [entry for entry in grids if entry[0].endswith("norm1")]
    name, module, side = (norms or grids)[-1]
    return TargetLayer(name, module, side, prefix)


def heatmaps(model: nn.Module, images: np.ndarray, classes: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """uint8 (N, H, W, 3) images and the class to explain for each -> Grad-CAM maps (N, H, W) in [0, 1]."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    size = images.shape[1]
    layer = target_layer(model, size)
    maps = []
    with GradCAM(model=model, target_layers=[layer.module], reshape_transform=layer.reshape) as cam:
        for start in range(0, len(images), batch_size):
            batch = to_float_batch(images[start : start + batch_size]).contiguous()
            targets = [ClassifierOutputTarget(int(c)) for c in classes[start : start + batch_size]]
            maps.append(cam(input_tensor=batch, targets=targets))
    return np.concatenate(maps) if maps else np.empty((0, size, size), dtype=np.float32)


def blend(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """One uint8 RGB image with its heatmap laid over it (jet colours, as pytorch-grad-cam draws them)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    return show_cam_on_image(rgb.astype(np.float32) / 255.0, heatmap, use_rgb=True, image_weight=0.55)
