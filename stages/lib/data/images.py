"""Inspecting and decoding one image file. Reads the user's files, never writes them.

`inspect_image` turns one file into a manifest row: ok (with hash, size, mode, format and a
note on anything normalised), or excluded with a reason that starts with a fixed code
(`REASONS`). `load_rgb` decodes an ok file upright (EXIF), as 8-bit RGB, resized to a square.
The pixel bound (`max_pixels`) is checked on the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps

from stages.lib.core.digest import bytes_sha256, file_sha256
from stages.lib.data.signatures import thumbnail

if TYPE_CHECKING:
    import pandas as pd

MANIFEST_COLUMNS = [
    "path",
    "label",
    "sha256",
    "width",
    "height",
    "mode",
    "format",
    "bytes",
    "status",
    "reason",
    "split",
    "note",
    "group",
    "likely_copy_of",
]

# The code before the colon in `reason`; the report and metrics count files per code.
REASONS = {
    "hidden or OS file": ".DS_Store, Thumbs.db, names starting with a dot, __MACOSX/ ...",
    "not in a class folder": "a file directly under the image folder has no label",
    "unreadable folder": "a folder that cannot be listed (permissions)",
    "symlink loop": "a folder reached again through a symlink; scanned once",
    "missing": "no such file (or a broken symlink)",
    "unreadable": "the file cannot be read (permissions, I/O error)",
    "empty file": "zero bytes",
    "not an image": "no image format recognised (a text file named .jpg, ...)",
    "corrupt image": "the header is readable but the pixel data is truncated or broken",
    "too large": "more pixels than validate.max_pixels (a possible decompression bomb); not decoded",
    "too small": "shorter side below validate.min_side",
    "unsupported mode": "a pixel format that cannot be turned into RGB",
    "duplicate": "the same content (sha256) as an earlier file of the same class; kept once",
    "label conflict": "the same content, or a verified near copy (see `group`), under two or more classes; left out",
    "corrected": "left out by a row of data/corrections.csv (its note follows)",
    "no label": "a manifest row without a label",
    "bad split": "a manifest split value other than train, val or test",
    "outside images folder": "a manifest path outside data.images_dir (DVC would not track it)",
}

# What an extension promises; a mismatch is kept (the content decides) and noted.
EXTENSION_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(slots=True)
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
    split: str = ""  # train/val/test when a CSV manifest pins it, else empty
    note: str = ""  # what was normalised in a usable file (format, mode, orientation), corrections applied
    group: str = ""  # near-copy group (signatures.py): the same id for every member; empty when it has no near copy
    likely_copy_of: str = ""  # the path of its best match outside its group (signatures.py); the split follows it
    signature: bytes = b""  # the perceptual signature (a thumbnail); kept in memory, not written

    def exclude(self, reason: str) -> "ManifestRow":
        self.status, self.reason = "excluded", reason
        return self

    def add_note(self, note: str) -> None:
        self.note = f"{self.note}; {note}" if self.note else note


def reason_code(reason: str) -> str:
    """'too small: 4x4 < min_side 8' -> 'too small'."""
    return reason.split(":", 1)[0]


@contextmanager
def header_only_limits():
    """Lift Pillow's own decompression-bomb guard while reading headers: `inspect_image` applies
    `max_pixels` itself, before decoding, and names the size in the reason."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1) or 1)
    except Exception:  # a broken EXIF block: the image is still usable, unrotated
        return 1


def _read_file(row: ManifestRow, path: str, in_memory_limit: int = 64 << 20) -> io.BytesIO | str | None:
    """Size and hash of one file; what to decode from (its bytes, read once, or for a file over
    in_memory_limit its path), or None with the row excluded when it cannot be read."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            row.exclude("not an image: a folder or device, not a file")
            return None
        row.bytes = info.st_size
        if row.bytes == 0:
            row.exclude("empty file: 0 bytes")
            return None
        if row.bytes > in_memory_limit:
            row.sha256 = file_sha256(path)
            return path
        with open(path, "rb") as handle:
            data = handle.read()
        row.sha256 = bytes_sha256(data)
        return io.BytesIO(data)
    except FileNotFoundError:
        row.exclude("missing: broken symlink" if os.path.islink(path) else "missing: no such file")
    except OSError as error:
        row.exclude(f"unreadable: {(error.strerror or str(error)).lower()}")
    return None


def inspect_image(row: ManifestRow, min_side: int, max_pixels: int, signature: bool = False) -> ManifestRow:
    """Fill size, mode, format and hash of one file; exclude it with a reason if unusable.

    min_side: shorter side, in pixels, below which a file is excluded.
    max_pixels: width x height above which a file is excluded from its header alone (never decoded).
    A usable file is decoded once, fully, to catch truncated or corrupt data, and converted to RGB
    when its mode is not RGB or L, so that the augment stage cannot fail on it later.
    signature: also keep the decoded pixels' perceptual signature (`signatures.thumbnail`) in the row.
    """
    path = row.path  # a string: per file, pathlib's parsing would be a sizeable share of a small image's decode
    source = _read_file(row, path)
    if source is None:
        return row
    try:
        with header_only_limits(), Image.open(source) as image:
            row.width, row.height = image.size
            row.mode, row.format = image.mode, image.format or ""
            if row.width * row.height > max_pixels:
                return row.exclude(
                    f"too large: {row.width}x{row.height} = {row.width * row.height} pixels "
                    f"> max_pixels {max_pixels} (not decoded)"
                )
            if signature and row.format == "JPEG":
                # the signature is grayscale: libjpeg then skips the colour conversion (every block is still
                # decoded, so broken or truncated data fails alike), and the thumbnail needs no conversion
                image.draft("L", None)
            image.load()
            orientation = _orientation(image)  # after load: PNG keeps EXIF after the pixel data
            rgb = image
            if image.mode not in ("RGB", "L"):
                try:
                    rgb = to_rgb(image)
                except (ValueError, OSError) as error:
                    return row.exclude(f"unsupported mode: {image.mode} ({error})")
                row.add_note(f"{image.mode} converted to RGB")
            if signature:
                row.signature = thumbnail(rgb)
    except Image.UnidentifiedImageError:
        return row.exclude(f"not an image: no image format recognised ({_suffix(path) or 'no extension'})")
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return row.exclude(f"corrupt image: {error}")
    if orientation in _TRANSPOSED:
        row.width, row.height = row.height, row.width
    if orientation != 1:
        row.add_note(f"EXIF orientation {orientation}: loaded upright")
    suffix = _suffix(path)
    promised = EXTENSION_FORMATS.get(suffix.lower())
    if promised and row.format and promised != row.format:
        row.add_note(f"extension {suffix} but {row.format} content")
    if min(row.width, row.height) < min_side:
        return row.exclude(f"too small: {row.width}x{row.height} < min_side {min_side}")
    return row


def _suffix(path: str) -> str:
    """`Path(path).suffix` without building a Path: '.jpg', or '' (none, or a name ending in a dot)."""
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency over white, 16-bit scaled down, CMYK converted."""
    if image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64) / 65535.0 * 255.0
        image = Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and array.max() <= 1.0 else (65535.0 if array.max() > 255 else 255.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_rgb(path: str | Path, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """Decode upright as RGB, resize the shorter side to `size`, centre-crop: uint8 (size, size, 3).

    JPEGs are decoded at a reduced scale when they are much larger than `size` (Pillow's draft mode).
    Pillow's own decompression-bomb guard stays on here: this may be called on files validate never saw.
    """
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        try:
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright photo
        except Exception:  # a broken EXIF block: keep the stored orientation
            image.load()
        rgb = image if image.mode == "RGB" else to_rgb(image)
        scale = size / min(rgb.size)
        resized = rgb.resize((max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))), resample)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def read_labelled_csv(path: str | Path) -> pd.DataFrame:
    """A manifest or split CSV with every column as text ('0' stays a class name, not a number);
    numeric manifest columns (width, height, bytes) are parsed as integers."""
    import pandas as pd

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in ("width", "height", "bytes"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").fillna(0).astype(int)
    return frame


def is_within(path: str | Path, folder: str | Path) -> bool:
    """True when path (symlinks left as written) lies inside folder."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder
