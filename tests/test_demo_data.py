"""The demo image sets: the shapes generator is seeded and writes an ordinary image folder."""

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from stages.demo_data import SHAPE_SIZE, SHAPES, write_shapes


def digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*.png"))
    }


def test_shapes_writes_one_folder_per_class_of_rgb_pngs(tmp_path):
    assert write_shapes(tmp_path, per_class=3, seed=7) == 3 * len(SHAPES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SHAPES)
    for shape in SHAPES:
        files = sorted((tmp_path / shape).glob("*.png"))
        assert [f.name for f in files] == ["0000.png", "0001.png", "0002.png"]
        with Image.open(files[0]) as image:
            assert image.mode == "RGB" and image.size == (SHAPE_SIZE, SHAPE_SIZE)


def test_shapes_are_deterministic_per_seed(tmp_path):
    write_shapes(tmp_path / "a", per_class=2, seed=3)
    write_shapes(tmp_path / "b", per_class=2, seed=3)
    write_shapes(tmp_path / "c", per_class=2, seed=4)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_more_images_per_class_keep_the_first_ones(tmp_path):
    write_shapes(tmp_path / "few", per_class=2, seed=0)
    write_shapes(tmp_path / "many", per_class=4, seed=0)
    few, many = digest(tmp_path / "few"), digest(tmp_path / "many")
    assert all(many[name] == value for name, value in few.items())


def test_images_of_one_class_differ(tmp_path):
    write_shapes(tmp_path, per_class=4, seed=0)
    pixels = [np.asarray(Image.open(path)) for path in sorted((tmp_path / "star").glob("*.png"))]
    assert all(not np.array_equal(pixels[0], other) for other in pixels[1:])
