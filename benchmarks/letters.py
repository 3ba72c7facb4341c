"""A "letters in fonts" image folder with known defects, for the data-audit benchmarks.

    python benchmarks/letters.py --out /tmp/letters   # writes the folder and /tmp/letters.truth.csv

The letters A-J, each rendered in every font found (matplotlib's bundled TTFs and the system's fonts,
`fc-list`; fonts that lack the letters, map them to symbols, or render two fonts identically are skipped),
at 64x64, with the defects real photo folders have:
- near copies: `copies` images get a copy in the same class, cropped by 1-4 px per side, resized,
  re-encoded as JPEG (quality 60-90) and made brighter or darker;
- wrong labels: `wrong_fraction` of the images are written into another class's folder;
- strays: `strays` images from another set (the demo's rendered shapes) spread over the classes.
The truth table beside the folder lists every file with its true class and what was done to it.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "ABCDEFGHIJ"
SIDE = 64


def font_files() -> list[Path]:
    """Every TTF/OTF file matplotlib ships and fontconfig knows, one per file name, sorted."""
    import matplotlib

    found = list((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf"))
    try:
        listed = subprocess.run(["fc-list", ":", "file"], capture_output=True, text=True, check=True).stdout
        found += [Path(line.split(":")[0]) for line in listed.splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        pass
    by_name = {}
    for path in sorted(found):
        if path.suffix.lower() in (".ttf", ".otf"):
            by_name.setdefault(path.name, path)
    return [by_name[name] for name in sorted(by_name)]


def draws_letters(path: Path) -> bool:
    """Whether the font's character map gives A-J glyphs named as those letters. A symbol or dingbat font
    maps them to other glyphs (Standard Symbols: Alpha, Beta, Chi...; dingbats: a10, a29...; TeX's cmex10:
    brackets): its "A" is not an A, so its renders would be strays labelled as letters. A font whose
    glyphs carry no names (a post table without them) counts as drawing letters."""
    from fontTools.ttLib import TTFont  # a matplotlib dependency

    try:
        cmap = TTFont(str(path), fontNumber=0, lazy=True).getBestCmap() or {}
    except Exception:  # noqa: BLE001 - an unreadable font is skipped by the renderer anyway
        return True
    names = [cmap.get(ord(letter)) for letter in LETTERS]
    return all(name in (None, letter) or name.startswith(("uni", "glyph")) for letter, name in zip(LETTERS, names))


def render(letter: str, font: ImageFont.FreeTypeFont) -> np.ndarray:
    """The letter, black on white, centred in a SIDE x SIDE grayscale image."""
    canvas = Image.new("L", (SIDE, SIDE), 255)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    draw.text(((SIDE - (right - left)) / 2 - left, (SIDE - (bottom - top)) / 2 - top), letter, font=font, fill=0)
    return np.asarray(canvas)


def font_renders(limit: int, max_correlation: float = 0.97) -> list[tuple[str, list[np.ndarray]]]:
    """(font name, its ten letters) for up to `limit` fonts whose letters are all drawn and distinct.

    A font whose letters correlate above `max_correlation` with an earlier font's (metric clones such as
    FreeSans, Nimbus Sans and Liberation Sans draw the same pixels) is skipped: its renders would be copies,
    not alike-but-distinct images.
    """
    kept, vectors = [], []
    for path in font_files():
        if not draws_letters(path):
            continue
        try:
            font = ImageFont.truetype(str(path), 44)
            letters = [render(letter, font) for letter in LETTERS]
        except (OSError, ValueError):
            continue
        ink = [(255 - image).sum() / 255 for image in letters]
        if min(ink) < 60 or len({image.tobytes() for image in letters}) < len(LETTERS):
            continue  # missing glyphs (empty or the same box for every letter)
        vector = np.stack([image.ravel() for image in letters]).astype(np.float64)
        vector -= vector.mean(axis=1, keepdims=True)
        vector /= np.linalg.norm(vector, axis=1, keepdims=True)
        if any((vector * other).sum(axis=1).mean() > max_correlation for other in vectors):
            continue
        vectors.append(vector)
        kept.append((path.stem, letters))
        if len(kept) == limit:
            break
    return kept


def near_copy(image: Image.Image, rng: np.random.Generator) -> bytes:
    """A copy as users end up with: cropped a few px, resized, brighter or darker, re-encoded as JPEG."""
    left, top, right, bottom = rng.integers(0, 5, size=4)
    cropped = image.crop((int(left), int(top), SIDE - int(right), SIDE - int(bottom)))
    side = int(rng.integers(48, 97))
    resized = cropped.resize((side, side), Image.Resampling.BILINEAR)
    shaded = ImageEnhance.Brightness(resized).enhance(
        float(rng.choice([rng.uniform(0.8, 0.92), rng.uniform(1.08, 1.2)]))
    )
    buffer = io.BytesIO()
    shaded.save(buffer, format="JPEG", quality=int(rng.integers(60, 91)))
    return buffer.getvalue()


def write_letters(
    out: Path, fonts: int = 174, copies: int = 130, wrong_fraction: float = 0.055, strays: int = 12, seed: int = 0
):
    """Write the folder; return the truth table (pandas): path (relative to out), true, given, kind, copy_of."""
    import pandas as pd

    sys.path.insert(0, str(ROOT))
    from stages.demo_data import SHAPES, render_shape

    rng = np.random.default_rng(seed)
    rows = []
    for font_name, letters in font_renders(fonts):
        for letter, pixels in zip(LETTERS, letters):
            rows.append(
                {
                    "image": Image.fromarray(pixels).convert("RGB"),
                    "true": letter,
                    "given": letter,
                    "kind": "original",
                    "copy_of": "",
                    "name": f"{font_name}_{letter}.png",
                }
            )
    originals = len(rows)
    copied = set(rng.choice(originals, size=copies, replace=False).tolist())
    for index in sorted(copied):
        source = rows[index]
        rows.append(
            {
                "bytes": near_copy(source["image"], rng),
                "true": source["true"],
                "given": source["true"],
                "kind": "copy",
                "copy_of": source["name"],
                "name": source["name"].replace(".png", "_copy.jpg"),
            }
        )
    for index in range(strays):
        shape = SHAPES[index % len(SHAPES)]
        rows.append(
            {
                "image": render_shape(shape, rng),
                "true": "stray",
                "given": LETTERS[index % len(LETTERS)],
                "kind": "stray",
                "copy_of": "",
                "name": f"stray_{shape}_{index}.png",
            }
        )
    candidates = [i for i, row in enumerate(rows) if row["kind"] == "original" and i not in copied]
    for index in rng.choice(candidates, size=round(wrong_fraction * len(rows)), replace=False):
        row = rows[index]
        row["given"] = str(rng.choice([letter for letter in LETTERS if letter != row["true"]]))
        row["kind"] = "wrong"
    table = []
    for row in rows:
        path = Path(row["given"]) / row["name"]
        (out / row["given"]).mkdir(parents=True, exist_ok=True)
        if "bytes" in row:
            (out / path).write_bytes(row["bytes"])
        else:
            row["image"].save(out / path)
        table.append(
            {
                "path": path.as_posix(),
                "true": row["true"],
                "given": row["given"],
                "kind": row["kind"],
                "copy_of": row["copy_of"],
            }
        )
    truth = pd.DataFrame(table).sort_values("path").reset_index(drop=True)
    # a copy's original may itself have been moved to another folder (a wrong label): name its written path
    where = {Path(p).name: p for p in truth["path"]}
    truth["copy_of"] = truth["copy_of"].map(lambda name: where.get(name, "") if name else "")
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fonts", type=int, default=174)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    truth = write_letters(args.out, fonts=args.fonts, seed=args.seed)
    truth.to_csv(args.out.with_suffix(".truth.csv"), index=False)
    print(f"{len(truth)} images in {args.out}: {truth['kind'].value_counts().to_dict()}")


if __name__ == "__main__":
    main()
