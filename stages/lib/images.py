"""Finding, inspecting and decoding images. Reads the user's files, never writes them.

`scan_image_folder` lists every file under `<images_dir>/<class>/`, `inspect_image` turns one
file into a manifest row (ok, or excluded with a reason), and `load_rgb` decodes an ok file
upright (EXIF), as 8-bit RGB, resized to a square.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MANIFEST_COLUMNS = ["path", "label", "sha256", "width", "height", "mode", "format", "bytes", "status", "reason"]
OS_LITTER = {".DS_Store", "Thumbs.db", "desktop.ini", "._.DS_Store"}


@dataclass
class ManifestRow:
    path: str
    label: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    bytes: int = 0
    status: str = "ok"
    reason: str = ""

    def exclude(self, reason: str) -> "ManifestRow":
        self.status, self.reason = "excluded", reason
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def scan_image_folder(images_dir: str | Path) -> list[ManifestRow]:
    """Every file below images_dir, sorted; the class is the first folder below images_dir.

    Hidden files, OS litter and files with no class folder are listed as excluded, so the
    report accounts for every file. Symlinks are followed; a directory loop is visited once.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: image folder not found")
    rows, seen_dirs = [], set()
    for folder, dirnames, filenames in os.walk(images_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(folder) / name
            parts = path.relative_to(images_dir).parts
            row = ManifestRow(path=path.as_posix(), label=parts[0] if len(parts) > 1 else "")
            if name in OS_LITTER or any(part.startswith(".") for part in parts):
                row.exclude("hidden or OS file")
            elif len(parts) == 1:
                row.exclude("not in a class folder")
            rows.append(row)
    return rows


def sha256_of(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_image(row: ManifestRow, min_side: int, max_pixels: int) -> ManifestRow:
    """Fill size, mode, format and hash of one file; exclude it with a reason if unusable.

    The header is read first so an oversized image is rejected before any pixel is decoded;
    then the image is fully decoded once to catch truncated or corrupt data.
    """
    path = Path(row.path)
    try:
        row.bytes = path.stat().st_size
        if row.bytes == 0:
            return row.exclude("empty file")
        row.sha256 = sha256_of(path)
    except OSError as error:
        return row.exclude(f"unreadable: {error.strerror or error}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                row.width, row.height = image.size
                row.mode, row.format = image.mode, image.format or ""
                if row.width * row.height > max_pixels:
                    return row.exclude(f"too large: {row.width}x{row.height} pixels > max_pixels {max_pixels}")
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return row.exclude(f"too large: decompression-bomb guard ({row.width}x{row.height})")
    except Image.UnidentifiedImageError:
        return row.exclude("not an image")
    except (OSError, SyntaxError, ValueError) as error:
        return row.exclude(f"corrupt image: {error}")
    if min(row.width, row.height) < min_side:
        return row.exclude(f"too small: {row.width}x{row.height} < min_side {min_side}")
    return row


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency over white, 16-bit scaled down, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_rgb(path: str | Path, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """Decode upright as RGB, resize the shorter side to `size`, centre-crop: uint8 (size, size, 3)."""
    with Image.open(path) as image:
        image = to_rgb(ImageOps.exif_transpose(image))
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), resample)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def resample_filter(interpolation: str) -> Image.Resampling:
    """timm's interpolation name ('bicubic', 'bilinear', ...) as a PIL filter."""
    return {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
        "lanczos": Image.Resampling.LANCZOS,
    }.get(interpolation, Image.Resampling.BICUBIC)


def mark_duplicates(rows: list[ManifestRow]) -> None:
    """Exclude repeated content: copies within a class keep the first file; the same content
    under two or more classes is a label conflict, and every copy is left out."""
    by_hash: dict[str, list[ManifestRow]] = {}
    for row in rows:
        if row.status == "ok":
            by_hash.setdefault(row.sha256, []).append(row)
    for copies in by_hash.values():
        labels = sorted({row.label for row in copies})
        if len(labels) > 1:
            for row in copies:
                row.exclude(f"label conflict: same image in classes {', '.join(labels)}")
            continue
        for row in copies[1:]:
            row.exclude(f"duplicate of {copies[0].path}")


def read_labelled_csv(path: str | Path) -> "pd.DataFrame":
    """A manifest or split CSV with path/label/sha256 kept as text ('0' stays a class name, not a number)."""
    import pandas as pd

    return pd.read_csv(path, dtype={"path": str, "label": str, "sha256": str, "reason": str}, keep_default_na=False)
