"""Write scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as an image folder.

    python -m stages.demo_data --out data/images [--per-class N]

Each image becomes `<out>/<digit>/<index>.png` (8-bit grayscale), an ordinary folder of
labelled images like the ones users bring. Then track it: `dvc add data/images`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: Path, per_class: int | None = None) -> int:
    """Write the digits as PNG files under out/<label>/; return the number written."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    written, seen = 0, {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        if per_class is not None and seen.get(label, 0) >= per_class:
            continue
        seen[label] = seen.get(label, 0) + 1
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.round(pixels * 255.0 / 16.0).astype(np.uint8), mode="L")
        image.save(folder / f"{index:04d}.png")
        written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/images"))
    parser.add_argument("--per-class", type=int, default=None, help="write at most N images per class")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} already holds images; leaving it as it is")
        return
    print(f"wrote {write_digits(args.out, args.per_class)} images to {args.out}")


if __name__ == "__main__":
    main()
