"""Write scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as an image folder.

    python -m stages.demo_data --out data/images [--per-class N] [--classes K]

Each image becomes `<out>/<digit>/<index>.png` (8-bit grayscale), an ordinary folder of
labelled images like the ones users bring. Then track it: `dvc add data/images`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: Path, per_class: int | None = None, classes: int | None = None) -> int:
    """Write the digits as PNG files under out/<label>/ (the first `classes` digits, at most
    `per_class` images each; None: all); return the number written."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    written, seen = 0, {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        if (per_class is not None and seen.get(label, 0) >= per_class) or (classes is not None and label >= classes):
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
    parser.add_argument("--classes", type=int, default=None, help="write only the digits 0 .. K-1")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} already holds images; leaving it as it is")
        return
    print(f"wrote {write_digits(args.out, args.per_class, args.classes)} images to {args.out}")


if __name__ == "__main__":
    main()
