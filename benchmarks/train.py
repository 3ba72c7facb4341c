"""Training throughput: one epoch through the pipeline's code against a plain timm loop.

    python benchmarks/train.py [--model tf_efficientnet_lite0] [--images 1280] [--size 64]
                               [--batch-size 64] [--repeats 2] [--device cpu|cuda]

Both sides train the same timm model (random init: weights do not change the speed) on the same
uint8 images (random pixels, 10 classes), at the same batch size and torch threads, without
augmentation, with the same work per step: BatchNorm statistics frozen (the pipeline's default
`train_bn: false`), label smoothing 0.1, AdamW from timm, gradient clipping at 1.0, channels_last.
- pipeline: `make_loaders` over the prepared-cache format (`PreparedDataset` on memory-mapped
  .npy files) and `Trainer.train_epoch` (scheduler per update, lr bookkeeping, progress bar);
- plain: a DataLoader over an in-memory uint8 tensor and a hand-written loop.
On CUDA both use AMP (bfloat16) and pinned memory, as the pipeline does by default.
Each side runs one untimed warm-up epoch, then `repeats` timed epochs, alternating; the best
epoch counts. Prints img/s of both and the ratio (pipeline / plain; target >= 0.95) and writes
benchmarks/results/train.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import headline, write_result  # noqa: E402  (benchmarks/machine.py, beside this script)

from stages.lib.core.timing import timed  # noqa: E402

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def make_images(folder: Path, count: int, size: int) -> None:
    """Random uint8 images and labels in the prepared-cache layout (train and val splits)."""
    from stages.lib.data.prepared import save_split

    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", 10)):
        save_split(folder, split, rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n))


def new_model(name: str, device: torch.device) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10).to(device, memory_format=torch.channels_last)


def pipeline_epoch(args, folder: Path, device: torch.device):
    """An epoch function running the pipeline's training code."""
    from stages.lib.core.params import Finetune, Phase
    from stages.lib.data.prepared import PreparedDataset
    from stages.lib.model.backbones import set_trainable
    from stages.lib.training.checkpoint import TrainState
    from stages.lib.training.distributed import Distributed
    from stages.lib.training.loaders import make_loaders
    from stages.lib.training.loop import PhaseTools, Trainer

    settings = Finetune(batch_size=args.batch_size, phases=[Phase(name="all", epochs=1, lr=1e-4)])
    recipe = settings.recipe(settings.phases[0])
    dist = Distributed(device=device)
    model = new_model(args.model, device)
    set_trainable(model, "all")
    trainer = Trainer(model, settings, MEAN, STD, dist)
    loader, _ = make_loaders(
        PreparedDataset(folder, "train"), PreparedDataset(folder, "val"), args.batch_size, dist, seed=0
    )
    step = PhaseTools.build(model, recipe, 1e-4, 1000, len(loader))
    step.train_bn = False
    state = TrainState()

    def epoch() -> int:
        trainer.train_epoch(model, loader, step, state, "pipeline")
        return len(loader.dataset)

    return epoch


def plain_epoch(args, folder: Path, device: torch.device):
    """An epoch function of a hand-written timm loop doing the same work per step."""
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.from_numpy(np.load(folder / "train_images.npy")).permute(0, 3, 1, 2)
    labels = torch.from_numpy(np.load(folder / "train_labels.npy"))
    loader = DataLoader(
        TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True, pin_memory=device.type == "cuda"
    )
    model = new_model(args.model, device)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    loss_fn = LabelSmoothingCrossEntropy(0.1)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

    def epoch() -> int:
        model.train()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        for x, y in loader:
            x = ((x.to(device, non_blocking=True).float() - mean) / std).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast():
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        return len(images)

    return epoch


def images_per_second(epoch, device: torch.device) -> float:
    """Images per second of one epoch."""
    seconds, count = timed(epoch, torch.cuda.synchronize if device.type == "cuda" else None)
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--images", type=int, default=1280)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as folder:
        make_images(Path(folder), args.images, args.size)
        epochs = {
            "pipeline": pipeline_epoch(args, Path(folder), device),
            "plain": plain_epoch(args, Path(folder), device),
        }
        for epoch in epochs.values():
            epoch()  # warm-up: allocator, kernels, first-touch of the memory map
        rates = {name: [] for name in epochs}
        for _ in range(args.repeats):
            for name, epoch in epochs.items():
                rates[name].append(images_per_second(epoch, device))

    best = {name: max(values) for name, values in rates.items()}
    ratio = best["pipeline"] / best["plain"]
    result = {
        "model": args.model,
        "images": args.images,
        "size": args.size,
        "batch_size": args.batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "amp": "bfloat16" if device.type == "cuda" else None,
        "channels_last": True,
        "img_per_s": {name: round(value, 1) for name, value in best.items()},
        "all_img_per_s": rates,
        "ratio": round(ratio, 3),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    print(
        f"{'':10s}{'img/s':>10s}   ({args.model}, {args.size}px, batch {args.batch_size}, {device}, "
        f"{torch.get_num_threads()} threads)"
    )
    for name, value in best.items():
        print(f"{name:10s}{value:10.1f}")
    print(f"{'ratio':10s}{ratio:10.3f}   (pipeline / plain; target >= 0.95)")
    write_result(
        "train",
        result,
        [
            headline(
                f"fine-tuning epoch ({args.model}, {args.size} px, batch {args.batch_size}, {device})",
                "img/s",
                best["pipeline"],
                best["plain"],
                "plain timm training loop",
                goal=">= 0.95",
                met=ratio >= 0.95,
            )
        ],
    )


if __name__ == "__main__":
    main()
