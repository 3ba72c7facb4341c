"""split: stratified, seeded, leak-free, and a manifest's own split column honoured."""

from __future__ import annotations

import pandas as pd
import pytest

from stages.lib.core.params import Split
from stages.lib.data.splits import SPLITS, SplitError, split_counts, split_manifest


def manifest(per_class: dict[str, int], split: dict[int, str] | None = None, copies: int = 1) -> pd.DataFrame:
    """A manifest of usable rows; `copies` rows share each content hash (as a user's copies would)."""
    rows = []
    for label, count in per_class.items():
        for index in range(count):
            for copy in range(copies):
                rows.append(
                    {
                        "path": f"data/images/{label}/{index:03d}_{copy}.png",
                        "label": label,
                        "sha256": f"{label}-{index:03d}",
                        "status": "ok",
                        "reason": "",
                        "split": "",
                    }
                )
    frame = pd.DataFrame(rows)
    for position, name in (split or {}).items():
        frame.loc[position, "split"] = name
    return frame


def test_stratified_deterministic_and_every_row_once():
    table = manifest({"a": 40, "b": 20, "c": 10})
    splits = split_manifest(table, Split(val_size=0.2, test_size=0.2), seed=1)
    assert sorted(pd.concat(splits.values())["path"]) == sorted(table["path"])
    counts = split_counts(splits)["per_class"]
    assert counts["test"] == {"a": 8, "b": 4, "c": 2} and counts["val"] == {"a": 8, "b": 4, "c": 2}
    again = split_manifest(table.sample(frac=1.0, random_state=7), Split(val_size=0.2, test_size=0.2), seed=1)
    assert all(splits[name].equals(again[name]) for name in SPLITS)  # row order does not matter, the seed does
    other = split_manifest(table, Split(val_size=0.2, test_size=0.2), seed=2)
    assert not splits["test"].equals(other["test"])


def test_identical_content_never_straddles_two_splits():
    splits = split_manifest(manifest({"a": 12, "b": 12}, copies=3), Split(), seed=0)
    homes = pd.concat([frame.assign(split=name) for name, frame in splits.items()]).groupby("sha256")["split"].nunique()
    assert (homes == 1).all() and len(homes) == 24


def test_a_class_too_small_to_split_is_named():
    with pytest.raises(SplitError, match=r"need 7 distinct images each\): b \(4\)"):
        split_manifest(manifest({"a": 20, "b": 4}), Split(), seed=0)


def test_max_per_class_caps_the_rows_split_by_ratio():
    splits = split_manifest(manifest({"a": 30, "b": 12}), Split(max_per_class=10), seed=0)
    assert dict(pd.concat(splits.values())["label"].value_counts().items()) == {"a": 10, "b": 10}


def test_a_manifest_split_column_is_honoured_and_the_rest_split_by_ratio():
    table = manifest({"a": 20, "b": 20})
    pinned = {0: "test", 1: "test", 2: "val", 20: "test", 21: "train", 22: "train"}
    table.loc[list(pinned), "split"] = list(pinned.values())
    splits = split_manifest(table, Split(), seed=0)
    where = {path: name for name, frame in splits.items() for path in frame["path"]}
    assert all(where[table.loc[position, "path"]] == name for position, name in pinned.items())
    assert len(where) == 40
    fully = table.assign(
        split=["train"] * 14 + ["val"] * 3 + ["test"] * 3 + ["train"] * 14 + ["val"] * 3 + ["test"] * 3
    )
    sizes = {name: len(frame) for name, frame in split_manifest(fully, Split(), seed=0).items()}
    assert sizes == {"train": 28, "val": 6, "test": 6}


def test_a_pinned_split_that_leaves_a_class_untrained_or_a_split_empty_fails():
    table = manifest({"a": 3, "b": 3})
    table["split"] = ["train", "val", "test", "val", "val", "test"]
    with pytest.raises(SplitError, match="classes with no training image: b"):
        split_manifest(table, Split(), seed=0)
    table["split"] = ["train", "train", "test", "train", "train", "test"]
    with pytest.raises(SplitError, match="no images in val"):
        split_manifest(table, Split(), seed=0)


def test_excluded_rows_are_never_split():
    table = manifest({"a": 10, "b": 10})
    table.loc[[0, 10], ["status", "reason"]] = ["excluded", "corrupt image: truncated"]
    paths = set(pd.concat(split_manifest(table, Split(), seed=0).values())["path"])
    assert table.loc[0, "path"] not in paths and len(paths) == 18


def test_near_copy_groups_stay_whole_and_the_split_keeps_its_proportions_in_images():
    table = manifest({"a": 120, "b": 80, "c": 40})
    table["group"] = ""
    for label, count in (("a", 120), ("b", 80), ("c", 40)):  # groups of 2 to 8 images: a third of each class
        rows = table.index[table["label"] == label][: count // 3]
        sizes = [2, 8, 3, 6, 2, 4, 5, 2, 8, 3][: len(rows)]
        start = 0
        for number, size in enumerate(sizes):
            table.loc[rows[start : start + size], "group"] = f"{label}-group-{number}"
            start += size
    settings = Split(val_size=0.15, test_size=0.15)
    splits = split_manifest(table, settings, seed=3)
    placed = pd.concat([frame.assign(split=name) for name, frame in splits.items()]).merge(table[["path", "group"]])
    assert sorted(placed["path"]) == sorted(table["path"])
    grouped = placed[placed["group"] != ""]
    assert (grouped.groupby("group")["split"].nunique() == 1).all()  # no group straddles two splits
    for label, frame in placed.groupby("label"):
        shares = frame["split"].value_counts(normalize=True)
        assert abs(shares["val"] - 0.15) <= 0.03 and abs(shares["test"] - 0.15) <= 0.03, (label, shares)
    again = split_manifest(table.sample(frac=1.0, random_state=5), settings, seed=3)
    assert all(splits[name].equals(again[name]) for name in SPLITS)


def test_likely_copies_join_their_match_within_max_unit_and_never_across_labels():
    table = manifest({"a": 60, "b": 60})
    table["group"], table["likely_copy_of"] = "", ""
    paths = list(table["path"])
    table.loc[0:3, "group"] = "a-group"  # a group of four, full for max_unit 5 but for one more
    table.loc[10, "likely_copy_of"] = paths[0]  # joins the group: five images
    table.loc[11, "likely_copy_of"] = paths[1]  # would make six: stays apart
    table.loc[20, "likely_copy_of"] = paths[21]  # two single images: one unit
    table.loc[30, "likely_copy_of"] = paths[70]  # another class: ignored
    settings = Split(val_size=0.15, test_size=0.15, max_unit=5)
    for seed in range(6):
        where = {path: name for name, frame in split_manifest(table, settings, seed).items() for path in frame["path"]}
        assert len({where[paths[index]] for index in (0, 1, 2, 3, 10)}) == 1
        assert where[paths[20]] == where[paths[21]]
    apart = {
        seed: {path: name for name, frame in split_manifest(table, settings, seed).items() for path in frame["path"]}
        for seed in range(12)
    }
    assert any(where[paths[11]] != where[paths[0]] for where in apart.values())  # not held by the bound
