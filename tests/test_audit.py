"""Trusting the data: near-copy groups in validate, a split that keeps them, corrections, the audit's findings."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from stages.demo_data import SHAPES, render_shape
from stages.lib.audit.findings import failed_checks, findings, headline, suggested_corrections
from stages.lib.audit.probes import AuditSet, out_of_sample_probabilities
from stages.lib.core.params import NearDuplicates, Split, Validate
from stages.lib.data.checks import group_split_check
from stages.lib.data.corrections import CorrectionError, apply_corrections, read_corrections
from stages.lib.data.manifest import build_manifest, scan_image_folder
from stages.lib.data.splits import SPLITS, random_split, split_manifest


def near_copy(image: Image.Image, rng: np.random.Generator) -> bytes:
    """Cropped by 1-3 px per side, resized, brighter or darker, re-encoded as JPEG."""
    left, top, right, bottom = (int(v) for v in rng.integers(1, 4, size=4))
    side = int(rng.integers(56, 90))
    cropped = image.crop((left, top, image.width - right, image.height - bottom)).resize((side, side))
    buffer = io.BytesIO()
    ImageEnhance.Brightness(cropped).enhance(float(rng.choice([0.85, 1.15]))).save(buffer, "JPEG", quality=75)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shapes_with_copies(tmp_path_factory):
    """60 distinct rendered shapes in 6 classes, 8 of them with a near copy in their class, one copy put in
    another class (a conflict). Returns (folder, {original path: copy path}, conflicting pair)."""
    folder = tmp_path_factory.mktemp("shapes") / "images"
    rng = np.random.default_rng(3)
    copies, conflict = {}, None
    for label in SHAPES[:6]:
        (folder / label).mkdir(parents=True)
        for index in range(10):
            render_shape(label, rng).save(folder / label / f"{index:02d}.png")
    for number, label in enumerate(SHAPES[:6] + SHAPES[:3]):
        original = folder / label / f"{number:02d}.png"
        target_label = SHAPES[5] if number == 8 else label
        copy = folder / target_label / f"copy_{number}.jpg"
        copy.write_bytes(near_copy(Image.open(original), rng))
        if number == 8:
            conflict = (original.as_posix(), copy.as_posix())
        else:
            copies[original.as_posix()] = copy.as_posix()
    return folder, copies, conflict


def test_near_copies_are_grouped_within_a_class_and_a_conflict_across_classes(shapes_with_copies):
    folder, copies, conflict = shapes_with_copies
    manifest = build_manifest(scan_image_folder(folder), 8, 40_000_000, near_duplicates=NearDuplicates())
    group = manifest.set_index("path")["group"]
    found = [original for original, copy in copies.items() if group[original] and group[original] == group[copy]]
    assert len(found) >= len(copies) - 1, sorted(set(copies) - set(found))  # noisy 64 px renders: one may be missed
    # only copies are grouped: distinct renders of one shape never are
    grouped = set(manifest.loc[manifest["group"] != "", "path"])
    assert grouped <= set(copies) | set(copies.values()) | set(conflict)
    status = manifest.set_index("path")["reason"]
    assert all(status[path].startswith("label conflict: near copy") for path in conflict)
    again = build_manifest(scan_image_folder(folder), 8, 40_000_000, near_duplicates=NearDuplicates(), workers=2)
    pd.testing.assert_frame_equal(manifest, again)  # deterministic, whatever the workers


def test_alike_images_never_chain_into_a_big_group():
    """Eighty renders of one letter, each shifted by a pixel from the last: every neighbour is alike."""
    from stages.lib.data.signatures import SIDE, near_copy_groups

    base = np.full((SIDE * 2, SIDE * 2), 255, np.uint8)
    base[20:44, 28:36] = 0
    thumbs = np.stack([np.roll(base, shift, axis=1)[::2, ::2] for shift in range(80)]).astype(np.float32)
    groups = near_copy_groups(thumbs, NearDuplicates(max_group_size=4))
    assert groups and max(len(group.members) for group in groups) <= 4


def test_the_split_never_separates_a_group_and_keeps_its_proportions():
    rng = np.random.default_rng(0)
    rows = []
    for label in "abcd":
        for index in range(60):
            group = f"{label}{index // 3}" if index < 30 else ""  # half the images in groups of three
            rows.append(
                {
                    "path": f"{label}/{index:03d}.png",
                    "label": label,
                    "sha256": f"{label}{index:03d}{rng.random()}",
                    "status": "ok",
                    "reason": "",
                    "split": "",
                    "group": group,
                }
            )
    manifest = pd.DataFrame(rows)
    splits = split_manifest(manifest, Split(), seed=1)
    where = {path: name for name in SPLITS for path in splits[name]["path"]}
    for _, members in manifest[manifest["group"] != ""].groupby("group"):
        assert len({where[path] for path in members["path"]}) == 1
    for name, share in (("val", 0.15), ("test", 0.15)):
        assert abs(len(splits[name]) / len(manifest) - share) < 0.05
        assert set(splits[name]["label"]) == set("abcd")
    assert split_manifest(manifest, Split(), seed=1)["test"].equals(splits["test"])  # deterministic


def test_without_groups_the_split_is_the_one_made_before_groups_existed():
    manifest = pd.DataFrame(
        {
            "path": [f"{label}/{i}.png" for label in "xyz" for i in range(20)],
            "label": [label for label in "xyz" for _ in range(20)],
            "sha256": [f"{label}{i:02d}" for label in "xyz" for i in range(20)],
            "status": "ok",
            "reason": "",
            "split": "",
            "group": "",
        }
    )
    splits = split_manifest(manifest, Split(), seed=42)
    before = random_split(manifest[["sha256", "label"]], 0.15, 0.15, 42)  # content hash -> split, as before
    assert {row.path: name for name in SPLITS for row in splits[name].itertuples()} == dict(
        zip(manifest["path"], manifest["sha256"].map(before))
    )


def test_a_group_pinned_to_two_splits_is_one_line_naming_its_files():
    manifest = pd.DataFrame(
        {
            "path": ["a.png", "b.png", "c.png"],
            "label": "x",
            "status": "ok",
            "split": ["train", "test", "train"],
            "group": ["g1", "g1", ""],
        }
    )
    warn = group_split_check(manifest, Validate())
    assert not warn.success and warn.severity == "warning"
    assert warn.unexpected == ["a.png (train), b.png (test)"]
    assert group_split_check(manifest, Validate(fail_on=["near_copies_one_split"])).severity == "error"


def test_corrections_are_applied_and_recorded_and_bad_rows_refused(tmp_path):
    folder = tmp_path / "images"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for index in range(3):
            render_shape(SHAPES[index], np.random.default_rng([index, len(label)])).save(
                folder / label / f"{index}.png"
            )
    corrections = tmp_path / "corrections.csv"
    corrections.write_text(
        f"path,action,label,note\n{folder.as_posix()}/cat/0.png,relabel,dog,a dog indeed\ndog/1.png,exclude,,blurry\n"
    )
    manifest = build_manifest(
        scan_image_folder(folder), 8, 40_000_000, corrections=read_corrections(corrections), images_dir=folder
    ).set_index("path")
    relabelled, excluded = (
        manifest.loc[f"{folder.as_posix()}/cat/0.png"],
        manifest.loc[f"{folder.as_posix()}/dog/1.png"],
    )
    assert relabelled["label"] == "dog" and "line 2" in relabelled["note"] and "a dog indeed" in relabelled["note"]
    assert (
        excluded["status"] == "excluded"
        and excluded["reason"].startswith("corrected:")
        and "blurry" in excluded["reason"]
    )
    rows = scan_image_folder(folder)
    for line, problem in (
        ("nowhere.png,exclude,,", "line 2: unknown path 'nowhere.png'"),
        ("cat/1.png,relabel,horse,", "line 2: unknown class 'horse'"),
        ("cat/1.png,delete,,", "line 2: unknown action 'delete'"),
    ):
        corrections.write_text(f"path,action,label,note\n{line}\n")
        with pytest.raises(CorrectionError, match=problem):
            apply_corrections(rows, read_corrections(corrections), folder)


def audit_set(seed: int = 0, swapped: int = 0, foreign: int = 0, leaked: int = 0) -> tuple[AuditSet, dict]:
    """Five well-separated classes of 80 embeddings each, with `swapped` labels, `foreign` points from
    elsewhere, and `leaked` near copies of training points placed in test."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(5, 32)) * 4
    labels = np.repeat(np.arange(5), 80)
    features = centres[labels] + rng.normal(0, 1, size=(len(labels), 32))
    truth = {"swapped": rng.choice(len(labels), swapped, replace=False)}
    labels = labels.copy()
    labels[truth["swapped"]] = (labels[truth["swapped"]] + 1 + rng.integers(0, 4, swapped)) % 5
    splits = np.array(["train"] * len(labels), dtype=object)
    splits[rng.choice(len(labels), 120, replace=False)] = "test"
    truth["foreign"] = np.arange(len(labels), len(labels) + foreign)
    features = np.concatenate([features, rng.normal(0, 1, size=(foreign, 32)) * 4 + 30])
    labels, splits = np.concatenate([labels, rng.integers(0, 5, foreign)]), np.concatenate([splits, ["val"] * foreign])
    sources = rng.choice(np.flatnonzero(splits == "train"), leaked, replace=False)
    features = np.concatenate([features, features[sources] + rng.normal(0, 0.01, size=(leaked, 32))])
    labels, splits = np.concatenate([labels, labels[sources]]), np.concatenate([splits, ["test"] * leaked])
    table = pd.DataFrame(
        {
            "path": [f"img/{i:04d}.png" for i in range(len(labels))],
            "label": [f"c{v}" for v in labels],
            "split": splits,
            "row": np.arange(len(labels)),
            "group": "",
        }
    )
    return AuditSet(
        table=table,
        features=features.astype(np.float32),
        labels=labels,
        classes=[f"c{i}" for i in range(5)],
        backbone="test",
    ), truth


def audit(data: AuditSet, neighbours: int = 20):
    probabilities = out_of_sample_probabilities(data, folds=5, C=0.1, max_iter=1000, seed=0, neighbours=neighbours)
    found = findings(data, probabilities, near_duplicate_threshold=0.13)
    return found, headline(found, len(data.table), outlier_score=0.01)


def test_swapped_labels_foreign_images_and_leaks_are_found():
    data, truth = audit_set(swapped=20, foreign=6, leaked=4)
    found, counts = audit(data)
    flagged = set(found.label_issues["path"])
    swapped = {f"img/{i:04d}.png" for i in truth["swapped"]}
    assert len(flagged & swapped) >= 0.85 * len(swapped) and len(flagged & swapped) >= 0.8 * len(flagged)
    foreign = {f"img/{i:04d}.png" for i in truth["foreign"]}
    assert foreign <= set(found.outliers["path"].head(10))
    assert counts["leaks"]["train_test"] >= 4 and "train_test_leak" in failed_checks(counts, 0.05)
    suggestions = suggested_corrections(found, 0.01)
    assert set(suggestions.columns) == {"path", "action", "label", "note"}
    assert swapped & set(suggestions.loc[suggestions["action"] == "relabel", "path"])
    again, _ = audit(data)
    pd.testing.assert_frame_equal(found.label_issues, again.label_issues)  # deterministic


def test_a_clean_set_raises_few_false_alarms():
    found, counts = audit(audit_set(seed=1)[0])
    assert counts["label_issue_fraction"] <= 0.01 and counts["leaks"]["across_splits"] == 0


def test_classes_made_of_several_clusters_keep_their_right_labels():
    """Each class is four separate clusters (a letter in several fonts): one linear boundary per class errs,
    and the nearest-neighbour vote keeps cleanlab from flagging the right labels those errors would accuse."""
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(16), 30)
    features = rng.normal(0, 1, size=(16, 8))[clusters] * 3 + rng.normal(0, 0.5, size=(len(clusters), 8))
    labels = clusters % 4
    moved = rng.choice(len(labels), 24, replace=False)
    labels[moved] = (labels[moved] + rng.integers(1, 4, len(moved))) % 4
    paths = [f"img/{i:04d}.png" for i in range(len(labels))]
    table = pd.DataFrame({"path": paths, "label": [f"c{v}" for v in labels], "split": "train", "row": 0, "group": ""})
    data = AuditSet(table, features.astype(np.float32), labels, [f"c{i}" for i in range(4)], "test")
    flagged, wrong = set(audit(data)[0].label_issues["path"]), {paths[i] for i in moved}
    assert len(flagged & wrong) >= 0.75 * len(wrong) and len(flagged & wrong) >= 0.9 * len(flagged)
