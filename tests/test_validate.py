"""validate: the CSV manifest input, the checks and the report, and real folders through `dvc repro`."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import dvc, make_project, run
from PIL import Image, ImageDraw, ImageEnhance, ImageFont
from test_images import tree_digest, write_bad_folder, write_png

from stages.lib.core.errors import PipelineError
from stages.lib.core.params import NearDuplicates, Validate
from stages.lib.data.checks import blocking_problems, markdown_report, run_checks, summarise
from stages.lib.data.images import reason_code
from stages.lib.data.manifest import build_manifest, read_manifest_csv, scan_image_folder
from stages.lib.data.signatures import as_array, near_copy_groups, thumbnail


def manifest_of(rows) -> pd.DataFrame:
    return build_manifest(rows, 8, 40_000_000)


# ------------------------------------------------------------------------------ CSV input
def test_csv_manifest_rows_are_resolved_against_the_image_folder(tmp_path):
    images = tmp_path / "images"
    for index in range(4):
        write_png(images / "pics" / f"{index}.png", index)
    write_png(tmp_path / "elsewhere.png", 9)
    (images / "labels.csv").write_text(
        "path,label,split\n"
        "pics/0.png,cat,train\n"
        f"{(images / 'pics/1.png').as_posix()},dog,\n"  # absolute, inside the folder
        "pics\\2.png,dog,TEST\n"  # written on Windows; split case-insensitive
        "pics/3.png,,\n"  # no label
        "pics/0.png,cat,holdout\n"  # not a split name
        "../elsewhere.png,cat,\n"  # outside the folder DVC tracks
        "pics/missing.png,cat,\n"
        "pics/1.png,dog,\n"
    )  # the same line twice
    manifest = manifest_of(read_manifest_csv(images / "labels.csv", images))
    reasons = [reason_code(reason) or status for reason, status in zip(manifest["reason"], manifest["status"])]
    assert reasons == ["ok", "ok", "ok", "no label", "bad split", "outside images folder", "missing", "duplicate"]
    assert manifest["reason"].iloc[-1] == "duplicate: listed twice"
    assert manifest["label"].tolist()[:3] == ["cat", "dog", "dog"]
    assert manifest["split"].tolist()[:3] == ["train", "", "test"]
    assert manifest.loc[2, "path"] == (images / "pics/2.png").as_posix()
    assert "line 6" in manifest.loc[4, "reason"]


def test_csv_manifest_errors_name_the_file_and_the_problem(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "labels.csv").write_text("path,label\n")
    with pytest.raises(PipelineError, match="must lie inside data.images_dir"):
        read_manifest_csv(tmp_path / "labels.csv", images)
    (images / "labels.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(PipelineError, match="no column path, label .*found file, class"):
        read_manifest_csv(images / "labels.csv", images)
    with pytest.raises(PipelineError, match="not found"):
        read_manifest_csv(images / "nope.csv", images)


# ------------------------------------------------------------------------ checks, report
def test_a_class_left_with_no_usable_image_fails_by_name_and_the_report_shows_why(tmp_path):
    images = tmp_path / "images"
    for offset, label in enumerate(("cat", "dog")):
        for index in range(6):
            write_png(images / label / f"{index}.png", 100 * offset + index)
    (images / "owl").mkdir()
    (images / "owl" / "broken.jpg").write_bytes(b"")
    (images / ".thumbnails").mkdir()
    (images / ".thumbnails" / "x.png").write_bytes(b"litter")  # hidden folders are not classes
    manifest = manifest_of(scan_image_folder(images))
    summary = summarise(manifest)
    assert summary["per_class"] == {
        "cat": {"ok": 6, "excluded": 0},
        "dog": {"ok": 6, "excluded": 0},
        "owl": {"ok": 0, "excluded": 1},
    }
    assert summary["excluded_by_reason"] == {"empty file": 1, "hidden or OS file": 1}
    assert summary["excluded_fraction"] == round(1 / 13, 4)  # litter is not a lost image
    checks, gx_results = run_checks(manifest, Validate())
    problems = blocking_problems(summary, checks)
    assert len(problems) == 1 and problems[0].startswith("min_images_per_class") and "owl (0 images)" in problems[0]
    assert {result["table"] for result in gx_results} == {"images", "classes", "summary"}
    assert all("results" in result["result"] for result in gx_results)

    report = markdown_report(summary, checks, manifest)
    assert "| owl | 0 | 1 |" in report and "| empty file | 1 |" in report
    assert f"- `{(images / 'owl' / 'broken.jpg').as_posix()}`: empty file: 0 bytes" in report
    assert "### min_images_per_class (error)" in report and "- `owl (0 images)`" in report


def test_unexpected_labels_and_a_single_class_are_blocking(tmp_path):
    images = tmp_path / "images"
    for index in range(6):
        write_png(images / "cat" / f"{index}.png", index)
    manifest = manifest_of(scan_image_folder(images))
    summary = summarise(manifest)
    checks, _ = run_checks(manifest, Validate(classes=["dog"]))
    problems = blocking_problems(summary, checks)
    assert problems[0] == "1 usable classes (a classifier needs at least 2)"
    assert any(problem.startswith("label_set") and "cat/0.png" in problem for problem in problems)


# ------------------------------------------------------------------------ through dvc repro
def test_a_folder_of_every_bad_input_goes_through_validate_split_augment(tmp_path):
    project = make_project(tmp_path / "project", images=False, overrides={"split": {"max_per_class": None}})
    images = project / "data" / "images"
    expected = write_bad_folder(images)
    os.symlink("..", images / "dog" / "loop")  # a symlink loop
    os.symlink(os.path.relpath(expected["good"][1], images / "dog"), images / "dog" / "cat_link.png")
    dvc(project, "add", "-q", "data/images")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "a folder collected over years")
    before = tree_digest(images)

    dvc(project, "repro", "augment")

    assert tree_digest(images) == before  # the user's files: same bytes, same modes, same links
    manifest = pd.read_csv(project / "data/manifest.csv", dtype=str, keep_default_na=False).set_index("path")
    relative = {path: path.relative_to(project).as_posix() for path in [*expected["bad"], *expected["good"]]}
    for path, reason in expected["bad"].items():
        assert reason_code(manifest.loc[relative[path], "reason"]) == reason, path
    assert reason_code(manifest.loc["data/images/dog/loop", "reason"]) == "symlink loop"
    # the cat image linked (DVC: copied) into dog is one picture under two labels: every copy out
    assert reason_code(manifest.loc[relative[expected["good"][1]], "reason"]) == "label conflict"
    assert reason_code(manifest.loc["data/images/dog/cat_link.png", "reason"]) == "label conflict"
    assert len(manifest) == len(before)  # every file the folder holds has a row

    good = {relative[path] for path in expected["good"] if path != expected["good"][1]}
    assert set(manifest.index[manifest["status"] == "ok"]) == good
    splits = {
        name: pd.read_csv(project / f"data/splits/{name}.csv", dtype=str)["path"].tolist()
        for name in ("train", "val", "test")
    }
    listed = [path for paths in splits.values() for path in paths]
    assert sorted(listed) == sorted(good)  # every good image in exactly one split

    metrics = json.loads((project / "metrics/validation.json").read_text())
    assert metrics == {"images": {"usable": len(good), "excluded": len(manifest) - len(good)}}
    summary = json.loads((project / "reports/validation/validation.json").read_text())["summary"]
    assert summary["excluded_by_reason"]["corrupt image"] == 2
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["classes"] == ["cat", "cats & dogs (2)", "dog"]
    assert meta["counts"] == {name: len(paths) for name, paths in splits.items()}
    report = (project / "reports/validation/validation.md").read_text()
    assert "| cats & dogs (2) | 8 | 0 |" in report and "| too large | 1 |" in report
    assert (project / "reports/validation/gx_results.json").exists()


def test_validate_fails_naming_the_class_after_writing_its_report(tmp_path):
    project = make_project(tmp_path / "project", images=False)
    images = project / "data" / "images"
    for index in range(6):
        write_png(images / "cat" / f"{index}.png", index)
        write_png(images / "dog" / f"{index}.png", 100 + index)
    for index in range(2):
        write_png(images / "owl" / f"{index}.png", 200 + index)
    (images / "owl" / "broken.png").write_bytes(b"\x89PNG\r\n")
    dvc(project, "add", "-q", "data/images")
    result = dvc(project, "repro", "validate", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "validate: the data cannot be used: min_images_per_class (images min_value=5.0): owl (2 images)" in output
    assert "Traceback" not in output
    assert "| owl | 2 | 1 |" in (project / "reports/validation/validation.md").read_text()


def test_a_csv_manifest_with_a_split_column_through_dvc(tmp_path):
    overrides = {"data": {"manifest": "data/images/labels.csv"}, "split": {"max_per_class": None}}
    project = make_project(tmp_path / "project", images=False, overrides=overrides)
    images = project / "data" / "images"
    lines = ["path,label,split"]
    for index in range(30):
        label = ("cat", "dog", "owl")[index % 3]
        write_png(images / "all" / f"{index:02d}.png", index)
        pinned = "test" if index < 6 else ("val" if index < 9 else "")
        lines.append(f"all/{index:02d}.png,{label},{pinned}")
    lines.append("all/missing.png,cat,")
    (images / "labels.csv").write_text("\n".join(lines) + "\n")
    dvc(project, "add", "-q", "data/images")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "images listed in a CSV")

    dvc(project, "repro", "split")

    manifest = pd.read_csv(project / "data/manifest.csv", dtype=str, keep_default_na=False).set_index("path")
    assert manifest.loc["data/images/all/missing.png", "reason"] == "missing: no such file"
    splits = {name: pd.read_csv(project / f"data/splits/{name}.csv", dtype=str) for name in ("train", "val", "test")}
    test_paths, val_paths = set(splits["test"]["path"]), set(splits["val"]["path"])
    assert {f"data/images/all/{index:02d}.png" for index in range(6)} <= test_paths
    assert {f"data/images/all/{index:02d}.png" for index in range(6, 9)} <= val_paths
    assert sum(len(frame) for frame in splits.values()) == 30
    assert set(splits["train"]["label"]) == {"cat", "dog", "owl"}

    # the CSV lies inside the tracked folder: relabelling an image makes validate out of date
    (images / "labels.csv").write_text((images / "labels.csv").read_text().replace("all/10.png,dog", "all/10.png,cat"))
    dvc(project, "add", "-q", "data/images")
    status = json.loads(dvc(project, "status", "--json").stdout)
    assert "validate" in status and "split" not in status


# ------------------------------------------------------------------------------ near copies: alike is not a copy


def _copy_of(image, rng):
    """A near copy as users make them: cropped 1-4 px per side, resized to 48-96 px, brighter or darker, JPEG."""
    left, top, right, bottom = (int(value) for value in rng.integers(1, 5, size=4))
    cropped = image.crop((left, top, image.width - right, image.height - bottom))
    scale = int(rng.integers(48, 97)) / min(cropped.size)
    resized = cropped.resize((round(cropped.width * scale), round(cropped.height * scale)), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    ImageEnhance.Brightness(resized).enhance(float(rng.choice([0.85, 1.15]))).save(buffer, "JPEG", quality=70)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _groups(images):
    """The near-copy groups (indexes) validate finds among in-memory images, at the default params."""
    thumbs, sides = as_array([thumbnail(image) for image in images]), np.array([min(image.size) for image in images])
    return [group.members for group in near_copy_groups(thumbs, NearDuplicates(), sides)]


def test_one_letter_in_four_fonts_is_four_images_and_only_its_copies_are_grouped():
    import matplotlib

    fonts = [
        ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), 48)
        for name in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf")
    ]
    rng = np.random.default_rng(0)
    for letter in "AEGR":
        renders = []
        for font in fonts:
            canvas = Image.new("RGB", (64, 64), "white")
            draw = ImageDraw.Draw(canvas)
            left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
            draw.text(((64 - right - left) / 2, (64 - bottom - top) / 2), letter, font=font, fill="black")
            renders.append(canvas)
        assert _groups(renders + [_copy_of(renders[0], rng), _copy_of(renders[3], rng)]) == [[0, 4], [3, 5]], letter


def test_a_burst_of_one_scene_is_not_grouped_while_copies_of_its_frames_are():
    rng = np.random.default_rng(1)
    frames = []
    for scene in range(3):
        backdrop = Image.fromarray(rng.uniform(0, 255, (5, 6, 3)).astype(np.uint8)).resize((200, 150), Image.BICUBIC)
        colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(3)]
        for frame in range(3):  # the camera moves 3 px a frame, the three subjects 6 px
            canvas = backdrop.copy()
            draw = ImageDraw.Draw(canvas)
            for subject in range(3):
                x, y = 30 + 50 * subject + 6 * frame, 40 + 20 * subject + ((scene + subject) % 2) * 6 * frame
                draw.ellipse((x, y, x + 36, y + 48), fill=colours[subject])
            view = np.asarray(canvas.crop((8 + 3 * frame, 8, 168 + 3 * frame, 128)), np.float32)
            frames.append(Image.fromarray(np.clip(view + rng.normal(0, 6, view.shape), 0, 255).astype(np.uint8)))
    groups = _groups(frames + [_copy_of(frames[0], rng), _copy_of(frames[4], rng)])
    assert groups == [[0, 9], [4, 10]]


def test_a_copy_below_the_bar_is_not_grouped_but_is_its_originals_best_match():
    import matplotlib

    from stages.lib.data.signatures import near_copies

    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), 48)
    rng = np.random.default_rng(2)
    renders = []
    for letter in "AEGR":
        canvas = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
        draw.text(((64 - right - left) / 2, (64 - bottom - top) / 2), letter, font=font, fill="black")
        renders.append(canvas)
    images = renders + [_copy_of(renders[1], rng)]
    thumbs, sides = as_array([thumbnail(image) for image in images]), np.array([min(image.size) for image in images])
    strict = near_copies(thumbs, NearDuplicates(min_similarity=0.985), sides)  # the copy: 0.97, within 3 x 0.015
    assert strict.groups == [] and strict.best_match[4] == 1 and strict.best_match[1] == 4
    assert near_copies(thumbs, NearDuplicates(), sides).groups[0].members == [1, 4]
