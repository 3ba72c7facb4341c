"""Write a demo image set as an image folder: scikit-learn's digits, or rendered shapes.

    python -m stages.demo_data --out data/images [--per-class N] [--classes K]
    python -m stages.demo_data --kind shapes --out data/images [--per-class N] [--seed S]
    python -m stages.demo_data --kind letters --out foreign/letters [--per-class N] [--seed S]

digits (the default): scikit-learn's 1,797 real 8x8 handwritten scans in 10 classes; each image
becomes `<out>/<digit>/<index>.png` (8-bit grayscale).
letters: printed capital letters A-Z in matplotlib's bundled fonts, drawn in the digits' own style
(white on black, 8x8, 17 grey levels, the brightest at full scale), with random size, offset and slant;
seeded. For showing a digits model images of another kind (docs/unknown.md): `<out>/<letter>/<index>.png`.
shapes: a second, unlike set, 10 classes of geometric shapes (150 each by default) rendered in
colour at 64x64 with random position, size, rotation and colours on a noisy background with
distractor strokes; seeded, so the same seed writes the same files. Each image becomes
`<out>/<shape>/<index>.png` (RGB).

Either is an ordinary folder of labelled images like the ones users bring. Then track it:
`dvc add data/images`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("arrow", "circle", "crescent", "cross", "hexagon", "pentagon", "ring", "square", "star", "triangle")
SHAPE_SIZE = 64  # pixels, each side of a written image
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then reduced: anti-aliased edges


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


def _rotated(
    points: list[tuple[float, float]], cx: float, cy: float, radius: float, angle: float
) -> list[tuple[float, float]]:
    """Unit-circle points scaled by radius, rotated by angle (radians) and moved to (cx, cy)."""
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]


def _regular(sides: int) -> list[tuple[float, float]]:
    return [(math.cos(2 * math.pi * k / sides), math.sin(2 * math.pi * k / sides)) for k in range(sides)]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [
        (
            (1.0 if k % 2 == 0 else inner) * math.cos(math.pi * k / points),
            (1.0 if k % 2 == 0 else inner) * math.sin(math.pi * k / points),
        )
        for k in range(2 * points)
    ]


_CROSS = [
    (-0.3, -1),
    (0.3, -1),
    (0.3, -0.3),
    (1, -0.3),
    (1, 0.3),
    (0.3, 0.3),
    (0.3, 1),
    (-0.3, 1),
    (-0.3, 0.3),
    (-1, 0.3),
    (-1, -0.3),
    (-0.3, -0.3),
]
_ARROW = [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)]
_OUTLINES = {
    "triangle": _regular(3),
    "square": _regular(4),
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "star": _star(),
    "cross": _CROSS,
    "arrow": _ARROW,
}


def shape_mask(shape: str, cx: float, cy: float, radius: float, angle: float, size: int) -> Image.Image:
    """An anti-aliased 8-bit mask (size x size) of one shape centred at (cx, cy) with the given
    radius (pixels) and rotation (radians)."""
    scale = SUPERSAMPLE
    mask = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(mask)
    x, y, r = cx * scale, cy * scale, radius * scale
    if shape in _OUTLINES:
        draw.polygon(_rotated(_OUTLINES[shape], x, y, r, angle), fill=255)
    elif shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        draw.ellipse((x - 0.6 * r, y - 0.6 * r, x + 0.6 * r, y + 0.6 * r), fill=0)
    elif shape == "crescent":  # a disc with an offset disc cut out, the cut in direction angle
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        bx, by = x + 0.45 * r * math.cos(angle), y + 0.45 * r * math.sin(angle)
        draw.ellipse((bx - 0.85 * r, by - 0.85 * r, bx + 0.85 * r, by + 0.85 * r), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask.resize((size, size), Image.Resampling.LANCZOS)


def _colour(rng: np.random.Generator, away_from: np.ndarray | None = None, min_distance: float = 90.0) -> np.ndarray:
    """A random RGB colour, at least min_distance (Euclidean, 0..255 units) from away_from."""
    while True:
        colour = rng.integers(0, 256, size=3).astype(np.float64)
        if away_from is None or np.linalg.norm(colour - away_from) >= min_distance:
            return colour


def render_shape(shape: str, rng: np.random.Generator, size: int = SHAPE_SIZE) -> Image.Image:
    """One RGB image of shape: random radius (15-40 % of the side), position (inside the image),
    rotation and colours, on a background with a few distractor strokes and pixel noise."""
    radius = rng.uniform(0.15, 0.4) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    background = _colour(rng)
    foreground = _colour(rng, away_from=background)
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(1, 4)):  # thin strokes in a third colour: edges that belong to no shape
        stroke = _colour(rng, away_from=background, min_distance=40.0)
        draw.line(
            [tuple(rng.uniform(0, size, size=2)), tuple(rng.uniform(0, size, size=2))],
            fill=tuple(int(c) for c in stroke),
            width=int(rng.integers(1, 3)),
        )
    alpha = np.asarray(shape_mask(shape, cx, cy, radius, angle, size), dtype=np.float64)[..., None] / 255.0
    pixels = np.asarray(canvas, dtype=np.float64) * (1 - alpha) + foreground * alpha
    pixels += rng.normal(0.0, rng.uniform(5.0, 30.0), size=pixels.shape)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), mode="RGB")


def write_shapes(out: Path, per_class: int | None = None, seed: int = 0) -> int:
    """Write per_class (default 150) rendered images of each of SHAPES as PNG files under
    out/<shape>/; seed fixes every random choice. Return the number written."""
    per_class = 150 if per_class is None else per_class
    written = 0
    for label, shape in enumerate(SHAPES):
        rng = np.random.default_rng([seed, label])  # one stream per class: --per-class keeps a prefix
        folder = out / shape
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            render_shape(shape, rng).save(folder / f"{index:04d}.png")
            written += 1
    return written


LETTER_FONTS = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSansMono",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "STIXGeneral",
    "cmr10",
    "cmss10",
)


def render_letter(letter: str, font_file: Path, rng: np.random.Generator, size: int = 8) -> Image.Image:
    """One letter, white on black, drawn large and reduced to size x size in the digits' 17 grey levels."""
    from PIL import ImageFont

    big = size * 8
    font = ImageFont.truetype(str(font_file), int(big * rng.uniform(0.7, 0.95)))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    x = (big - (right - left)) / 2 - left + rng.uniform(-0.08, 0.08) * big
    y = (big - (bottom - top)) / 2 - top + rng.uniform(-0.08, 0.08) * big
    draw.text((x, y), letter, fill=255, font=font)
    canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
    small = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    levels = np.round(small / max(small.max(), 1.0) * 16.0)  # the brightest pixel at full scale, as in the digits
    return Image.fromarray(np.round(levels * 255.0 / 16.0).astype(np.uint8), mode="L")


def write_letters(out: Path, per_class: int | None = None, seed: int = 0) -> int:
    """Write per_class (default 60) rendered images of each capital letter under out/<letter>/, cycling
    through LETTER_FONTS; seed fixes every random choice. Return the number written."""
    import matplotlib

    fonts = [Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{name}.ttf" for name in LETTER_FONTS]
    per_class = 60 if per_class is None else per_class
    written = 0
    for label in range(26):
        letter, rng = chr(ord("A") + label), np.random.default_rng([seed, label])
        folder = out / letter
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            render_letter(letter, fonts[index % len(fonts)], rng).save(folder / f"{index:04d}.png")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/images"))
    parser.add_argument("--kind", choices=("digits", "shapes", "letters"), default="digits", help="which image set")
    parser.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="digits: write at most N images per class; shapes: N per class (default 150); letters: (default 60)",
    )
    parser.add_argument("--classes", type=int, default=None, help="digits: write only the digits 0 .. K-1")
    parser.add_argument("--seed", type=int, default=0, help="shapes, letters: the seed of every random choice")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} already holds images; leaving it as it is")
        return
    if args.kind == "shapes":
        written = write_shapes(args.out, args.per_class, args.seed)
    elif args.kind == "letters":
        written = write_letters(args.out, args.per_class, args.seed)
    else:
        written = write_digits(args.out, args.per_class, args.classes)
    print(f"wrote {written} images to {args.out}")


if __name__ == "__main__":
    main()
