"""Every kind of file a real image folder holds, built for real, through the scan, inspection and decoding.

The builders here (`write_*`, `write_bad_folder`) are also used by the validate integration test.
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.lib.data.images import ManifestRow, inspect_image, load_rgb, reason_code, to_rgb
from stages.lib.data.manifest import build_manifest, scan_image_folder

MIN_SIDE, MAX_PIXELS = 8, 40_000_000


# ------------------------------------------------------------------------------- builders
def noise(seed: int, size: tuple[int, int] = (24, 24)) -> np.ndarray:
    """A distinct RGB image (uint8 HxWx3) per seed."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def write_png(path: Path, seed: int, size: tuple[int, int] = (24, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(seed, size)).save(path, format="PNG")
    return path


def encoded(seed: int, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(seed)).save(buffer, format=format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels (30 GB decoded), with a tiny body."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def exif_rotated_jpeg(path: Path) -> Path:
    """Stored 40x20, top half red, bottom half blue, with EXIF orientation 6 (display rotated 90 degrees
    clockwise): upright it is 20x40 with the blue half on the left and the red half on the right."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:10, :, 0] = 255
    pixels[10:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def write_special_modes(folder: Path) -> dict[str, Path]:
    """Usable images in every awkward mode, each distinct content; name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    gradient = (np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) * 113 % 65536).astype(np.uint16)
    files = {
        "cmyk": (Image.fromarray(noise(101)).convert("CMYK"), "cmyk.jpg", "JPEG"),
        "16bit": (Image.fromarray(gradient), "sixteen.png", "PNG"),
        "palette": (Image.fromarray(noise(102)).convert("P", palette=Image.Palette.ADAPTIVE), "palette.png", "PNG"),
        "la": (Image.fromarray(noise(103)[..., :2].copy(), mode="LA"), "la.png", "PNG"),
        "rgba": (Image.fromarray(np.dstack([noise(104), noise(105)[..., :1]]), mode="RGBA"), "rgba.png", "PNG"),
        "gray": (Image.fromarray(noise(106)[..., 0].copy(), mode="L"), "gray.png", "PNG"),
        "png_named_jpg": (Image.fromarray(noise(107)), "really_a_png.jpg", "PNG"),
    }
    paths = {}
    for name, (image, filename, format) in files.items():
        image.save(folder / filename, format=format)
        paths[name] = folder / filename
    paths["exif_rotated"] = exif_rotated_jpeg(folder / "rotated.jpg")
    return paths


def write_bad_folder(images: Path, good_per_class: int = 8, classes=("cat", "dog", "cats & dogs (2)")) -> dict:
    """An image folder with good images in each class and every kind of bad input next to them.

    Returns {"good": [paths of usable images], "bad": {path: expected reason code}, "kept": {path: note}}.
    Symlinks and unreadable files are left to the callers that can use them (DVC replaces symlinked
    files with copies on `dvc add`).
    """
    good, bad = [], {}
    seed = 0
    for label in classes:
        for index in range(good_per_class):
            good.append(write_png(images / label / f"{index:02d}.png", seed := seed + 1))
    first, second = classes[0], classes[1]
    special = write_special_modes(images / first / "modes")
    good += list(special.values())

    def put(relative: str, content: bytes, reason: str) -> None:
        path = images / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        bad[path] = reason

    put(f"{first}/zero.jpg", b"", "empty file")
    put(f"{first}/truncated.png", encoded(900, "PNG")[:300], "corrupt image")
    put(f"{second}/truncated.jpg", encoded(901, "JPEG", quality=90)[:400], "corrupt image")
    put(f"{second}/notes.jpg", b"shopping list: milk, eggs\n", "not an image")
    put(f"{second}/bomb.png", bomb_png(), "too large")
    put(f"{first}/tiny.png", _tiny_png(), "too small")
    put(f"{first}/.DS_Store", b"\0\0\0\1Bud1", "hidden or OS file")
    put(f"{second}/Thumbs.db", b"\xd0\xcf\x11\xe0", "hidden or OS file")
    put(f"{second}/.hidden.png", encoded(903, "PNG"), "hidden or OS file")
    put("stray.png", encoded(904, "PNG"), "not in a class folder")
    # the same picture under two classes: a label conflict, every copy out
    put(f"{first}/conflict.png", encoded(905, "PNG"), "label conflict")
    put(f"{second}/conflict_copy.png", encoded(905, "PNG"), "label conflict")
    # an exact copy within one class: kept once (the first by path), the copy out
    shutil.copyfile(good[0], images / first / "zz_copy.png")
    bad[images / first / "zz_copy.png"] = "duplicate"
    return {"good": good, "bad": bad}


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(906, (4, 4))).save(buffer, format="PNG")
    return buffer.getvalue()


def tree_digest(folder: Path) -> dict[str, str]:
    """path -> sha256 of content (or link target) of everything under folder, symlinks not followed."""
    digest = {}
    for root, dirnames, filenames in os.walk(folder):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            if os.path.islink(path):
                digest[path] = "link:" + os.readlink(path)
            else:
                digest[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest() + f":{os.stat(path).st_mode:o}"
    return digest


def inspect(path: Path, label: str = "x", **limits) -> ManifestRow:
    return inspect_image(
        ManifestRow(path=str(path), label=label), limits.get("min_side", MIN_SIDE), limits.get("max_pixels", MAX_PIXELS)
    )


# ------------------------------------------------------------------------------- inspect
def test_broken_files_are_excluded_with_the_reason(tmp_path):
    cases = {
        "zero.jpg": (b"", "empty file"),
        "truncated.png": (encoded(1, "PNG")[:300], "corrupt image"),
        "truncated.jpg": (encoded(2, "JPEG", quality=90)[:400], "corrupt image"),
        "text.jpg": (b"not a picture at all\n", "not an image"),
        "bomb.png": (bomb_png(), "too large"),
        "tiny.png": (_tiny_png(), "too small"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        row = inspect(tmp_path / name)
        assert (row.status, reason_code(row.reason)) == ("excluded", expected), (name, row.reason)
    assert "100000x100000" in inspect(tmp_path / "bomb.png").reason


def test_the_pixel_bound_is_the_param_not_pillows(tmp_path):
    write_png(tmp_path / "big.png", 3, (200, 100))
    assert reason_code(inspect(tmp_path / "big.png", max_pixels=19_999).reason) == "too large"
    assert inspect(tmp_path / "big.png", max_pixels=20_000).status == "ok"


def test_a_decompression_bomb_is_refused_from_its_header_without_memory_growth(tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(60_000, 60_000))  # 10.8 GB if decoded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = inspect(tmp_path / "bomb.png", max_pixels=178_956_970)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert reason_code(row.reason) == "too large" and (row.width, row.height) == (60_000, 60_000)
    assert grown_mb < 100
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is back for other callers


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file; permissions cannot be tested as root")
def test_an_unreadable_file_is_excluded(tmp_path):
    path = write_png(tmp_path / "locked.png", 4)
    path.chmod(0)
    try:
        row = inspect(path)
        assert reason_code(row.reason) == "unreadable" and "permission" in row.reason
    finally:
        path.chmod(0o644)


def test_awkward_modes_are_kept_and_noted(tmp_path):
    paths = write_special_modes(tmp_path)
    rows = {name: inspect(path) for name, path in paths.items()}
    assert {name: row.status for name, row in rows.items()} == dict.fromkeys(paths, "ok")
    assert rows["cmyk"].mode == "CMYK" and "CMYK converted to RGB" in rows["cmyk"].note
    assert rows["16bit"].mode.startswith("I;16")
    assert rows["palette"].mode == "P" and rows["la"].mode == "LA" and rows["rgba"].mode == "RGBA"
    assert rows["gray"].mode == "L" and rows["gray"].note == ""
    # the extension lies: the file is kept, its real format recorded and the mismatch noted
    assert rows["png_named_jpg"].format == "PNG" and "extension .jpg but PNG content" in rows["png_named_jpg"].note
    # EXIF rotation: the manifest gives the upright size
    assert (rows["exif_rotated"].width, rows["exif_rotated"].height) == (20, 40)
    assert "orientation 6" in rows["exif_rotated"].note
    for path in paths.values():
        array = load_rgb(path, 16)
        assert array.shape == (16, 16, 3) and array.dtype == np.uint8


def test_exif_rotated_photo_loads_upright(tmp_path):
    upright = load_rgb(exif_rotated_jpeg(tmp_path / "rotated.jpg"), 20).astype(int)
    left, right = upright[:, :8].mean(axis=(0, 1)), upright[:, 12:].mean(axis=(0, 1))
    assert left[2] > 200 and left[0] < 60  # blue on the left
    assert right[0] > 200 and right[2] < 60  # red on the right


def test_to_rgb_scales_16_bit_and_puts_transparency_over_white():
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(sixteen))[0, :, 0].tolist() == [0, 128, 255]
    clear = Image.fromarray(np.zeros((2, 2, 4), dtype=np.uint8), mode="RGBA")
    assert np.asarray(to_rgb(clear)).tolist() == [[[255, 255, 255]] * 2] * 2
    half = Image.fromarray(np.array([[[0, 128]]], dtype=np.uint8), mode="LA")
    assert np.asarray(to_rgb(half))[0, 0].tolist() == [127, 127, 127]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 0, 0))  # full magenta ink
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 1].tolist() == [0, 128, 255]


# ---------------------------------------------------------------------------------- scan
def test_scan_lists_every_file_and_flags_litter_stray_files_and_loops(tmp_path):
    images = tmp_path / "images"
    write_png(images / "cat" / "a.png", 1)
    write_png(images / "cat" / "nested" / "b.png", 2)
    write_png(images / "stray.png", 3)
    for litter in ("cat/.DS_Store", "cat/Thumbs.db", "cat/.hidden.png", "__MACOSX/cat/._a.png", ".cache/x.png"):
        (images / litter).parent.mkdir(parents=True, exist_ok=True)
        (images / litter).write_bytes(b"litter")
    os.symlink("..", images / "cat" / "loop")  # a loop back to the image folder
    os.symlink(images / "cat" / "a.png", images / "cat" / "link.png")  # a symlink to a file
    os.symlink(images / "gone.png", images / "cat" / "dangling.png")
    rows = {row.path.removeprefix(images.as_posix() + "/"): row for row in scan_image_folder(images)}

    assert rows["cat/a.png"].label == "cat" and rows["cat/a.png"].status == "ok"
    assert rows["cat/nested/b.png"].label == "cat"  # deeper folders belong to the top class
    assert rows["cat/link.png"].status == "ok"  # followed
    assert reason_code(rows["stray.png"].reason) == "not in a class folder"
    for litter in ("cat/.DS_Store", "cat/Thumbs.db", "cat/.hidden.png", "__MACOSX/cat/._a.png", ".cache/x.png"):
        assert rows[litter].reason == "hidden or OS file", litter
    assert reason_code(rows["cat/loop"].reason) == "symlink loop"
    assert not any(path.startswith("cat/loop/") for path in rows)  # the loop is not walked into

    manifest = build_manifest(scan_image_folder(images), MIN_SIDE, MAX_PIXELS).set_index("path")
    by_name = {path.removeprefix(images.as_posix() + "/"): row for path, row in manifest.iterrows()}
    assert by_name["cat/dangling.png"]["reason"] == "missing: broken symlink"
    assert by_name["cat/link.png"]["reason"] == f"duplicate: same content as {images.as_posix()}/cat/a.png"


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists any folder; permissions cannot be tested as root")
def test_an_unreadable_folder_is_reported(tmp_path):
    images = tmp_path / "images"
    write_png(images / "cat" / "locked" / "a.png", 1)
    (images / "cat" / "locked").chmod(0)
    try:
        rows = scan_image_folder(images)
        assert [reason_code(row.reason) for row in rows] == ["unreadable folder"]
    finally:
        (images / "cat" / "locked").chmod(0o755)


def test_scan_of_a_missing_folder_names_it(tmp_path):
    from stages.lib.core.errors import PipelineError

    with pytest.raises(PipelineError, match="not a folder"):
        scan_image_folder(tmp_path / "nowhere")


def test_every_bad_input_gets_its_reason_and_the_users_files_are_untouched(tmp_path):
    images = tmp_path / "images"
    expected = write_bad_folder(images)
    os.symlink(expected["good"][1], images / "dog" / "link_to_cat.png")  # a symlink across classes
    before = tree_digest(images)
    manifest = build_manifest(scan_image_folder(images), MIN_SIDE, MAX_PIXELS)
    assert tree_digest(images) == before

    rows = manifest.set_index("path")
    for path, reason in expected["bad"].items():
        assert reason_code(rows.loc[path.as_posix(), "reason"]) == reason, path
    usable = [expected["good"][0], *expected["good"][2:]]
    assert set(rows.loc[[path.as_posix() for path in usable], "status"]) == {"ok"}
    # the symlinked cat image under dog is the same picture in two classes: both copies out
    assert reason_code(rows.loc[expected["good"][1].as_posix(), "reason"]) == "label conflict"
    assert len(manifest) == len(before)  # every file, good or bad, has a row
