"""Train/val/test assignment of the manifest's usable images: stratified, seeded, leak-free.

Images with identical content (same sha256) form one group and land in one split together, and so do
the near copies validate grouped (the manifest's `group` column): a group is split as one unit, so no
split ever separates it. An image also joins the unit of its likely copy (the manifest's `likely_copy_of`,
the image validate found most alike outside its group) when both have the same label, neither is pinned,
and the joined unit stays within `split.max_unit` images: a copy that no group could take (its similarity
just below the bar, or both groups full) then stays with its original all the same. Rows whose `split`
column is set (a CSV manifest's own split) keep it (validate reports a group pinned to two splits); their
unpinned near copies follow them. The other groups are split by `split.val_size` / `split.test_size`,
stratified by label, counted in images (`grouped_split`: a group of eight counts eight). Every class must
end up in train. When no image has a near or likely copy, each group is one image keyed by its sha256,
split as before groups existed: the same data and seed give the same split.
"""

from __future__ import annotations

import logging

import pandas as pd

from stages.lib.core.errors import PipelineError
from stages.lib.core.params import Split

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class SplitError(PipelineError, ValueError):
    """The usable images cannot be split as the params ask."""


def check_class_sizes(groups: pd.DataFrame, val_size: float, test_size: float) -> None:
    """Each class needs at least one content group in every split; say which class cannot."""
    smallest_share = min(val_size, test_size, 1 - val_size - test_size)
    needed = max(3, int(-(-1 // smallest_share)))  # ceil(1 / smallest share)
    counts = groups["label"].value_counts()
    too_small = counts[counts < needed].sort_index()
    if len(too_small):
        listed = ", ".join(f"{label} ({count})" for label, count in too_small.items())
        raise SplitError(
            f"split: classes too small for val_size={val_size}, test_size={test_size} "
            f"(need {needed} distinct images each): {listed}"
        )


def random_split(groups: pd.DataFrame, val_size: float, test_size: float, seed: int) -> pd.Series:
    """Content groups (sha256, label) -> their split name, stratified by label."""
    from sklearn.model_selection import train_test_split  # scikit-learn and scipy: a second to import

    groups = groups.sort_values("sha256").reset_index(drop=True)
    check_class_sizes(groups, val_size, test_size)
    rest, test = train_test_split(groups, test_size=test_size, stratify=groups["label"], random_state=seed)
    train, val = train_test_split(rest, test_size=val_size / (1 - test_size), stratify=rest["label"], random_state=seed)
    return pd.concat(
        [part["sha256"].to_frame().assign(split=name) for name, part in zip(SPLITS, (train, val, test))]
    ).set_index("sha256")["split"]


def grouped_split(groups: pd.DataFrame, sizes: pd.Series, val_size: float, test_size: float, seed: int) -> pd.Series:
    """Units (sha256 = a near-copy group or one image, label) of `sizes` images each -> their split name,
    so that each class's val and test hold their share of its *images*, not of its units.

    Per class, in a seeded order: the two smallest units open val and test (so that every class is in every
    split), then the others, largest first, each go to the split furthest below its target number of
    images. A split ends within one unit of its target: with units of a few images, within a point or two of
    `val_size` / `test_size` on any class of some size."""
    import numpy as np

    groups = groups.sort_values("sha256").reset_index(drop=True)
    check_class_sizes(groups, val_size, test_size)
    shares = {"train": 1 - val_size - test_size, "val": val_size, "test": test_size}
    groups = groups.assign(
        images=sizes[groups["sha256"]].to_numpy(), order=np.random.default_rng(seed).permutation(len(groups))
    )
    assignment = {}
    for _, units in groups.groupby("label", sort=True):
        total, held = int(units["images"].sum()), dict.fromkeys(SPLITS, 0)
        smallest = units.sort_values(["images", "order"])
        rest = smallest.iloc[2:].sort_values(["images", "order"], ascending=[False, True])
        for position, (unit, images) in enumerate(
            pd.concat([smallest.iloc[:2], rest])[["sha256", "images"]].itertuples(index=False)
        ):
            name = (
                ("val", "test")[position]
                if position < 2
                else max(SPLITS, key=lambda split: shares[split] * total - held[split])
            )
            assignment[unit] = name
            held[name] += int(images)
    return pd.Series(assignment, name="split").rename_axis("sha256")


def follow_likely_copies(usable: pd.DataFrame, max_unit: int) -> pd.Series:
    """Each row's unit once every row, in path order, has joined its likely copy's unit (same label, neither
    unit pinned by the manifest's split column, at most `max_unit` images joined)."""
    unit = dict(zip(usable["path"], usable["unit"]))
    members = usable.groupby("unit")["path"].apply(list).to_dict()
    label = dict(zip(usable["path"], usable["label"]))
    pinned = set(usable.loc[usable["split"] != "", "unit"])
    for path, other in sorted(zip(usable["path"], usable["likely_copy_of"])):
        if not other or other not in unit or label[other] != label[path]:
            continue
        a, b = unit[path], unit[other]
        if a == b or a in pinned or b in pinned or len(members[a]) + len(members[b]) > max_unit:
            continue
        keep, gone = min(a, b), max(a, b)
        for member in members[gone]:
            unit[member] = keep
        members[keep] += members.pop(gone)
    return usable["path"].map(unit)


def split_manifest(manifest: pd.DataFrame, settings: Split, seed: int) -> dict[str, pd.DataFrame]:
    """Usable rows -> {'train','val','test'}: DataFrames of path, label, sha256 sorted by path.

    settings: the `split` params (val_size, test_size, max_per_class: the cap applies to the rows split
    here, not to rows whose split the manifest pins; max_unit: see `follow_likely_copies`).
    """
    usable = manifest[manifest["status"] == "ok"].copy()
    for column in ("split", "group", "likely_copy_of"):
        if column not in usable:
            usable[column] = ""
    # the unit of splitting: a near-copy group, else the image's content hash (the column keeps its old name)
    usable["unit"] = usable["group"].where(usable["group"] != "", usable["sha256"])
    usable["unit"] = follow_likely_copies(usable, settings.max_unit)
    pinned_unit = usable[usable["split"] != ""].groupby("unit")["split"].first()
    usable["split"] = usable["split"].where(usable["split"] != "", usable["unit"].map(pinned_unit).fillna(""))
    groups = (
        usable.groupby("unit", sort=True)
        .agg(label=("label", "first"), split=("split", "first"))
        .reset_index()
        .rename(columns={"unit": "sha256"})
    )
    pinned, free = groups[groups["split"] != ""], groups[groups["split"] == ""]
    if settings.max_per_class:
        free = free.sample(frac=1.0, random_state=seed).groupby("label").head(settings.max_per_class)
    assignment = pinned.set_index("sha256")["split"]
    if len(free):
        sizes = usable.groupby("unit").size()
        if (sizes[free["sha256"]] > 1).any():
            ratio_split = grouped_split(free, sizes, settings.val_size, settings.test_size, seed)
        else:
            ratio_split = random_split(free, settings.val_size, settings.test_size, seed)
        assignment = pd.concat([assignment, ratio_split])
    if len(pinned):
        log.info("%d images keep the split the manifest gives them; %d are split by ratio", len(pinned), len(free))
    usable = usable[usable["unit"].isin(assignment.index)]
    pinned_rows = usable["split"] != ""
    usable["split"] = usable["split"].where(pinned_rows, usable["unit"].map(assignment))
    splits = {
        name: usable.loc[usable["split"] == name, ["path", "label", "sha256"]]
        .sort_values("path")
        .reset_index(drop=True)
        for name in SPLITS
    }
    check_coverage(splits, sorted(set(usable["label"])))
    return splits


def check_coverage(splits: dict[str, pd.DataFrame], classes: list[str]) -> None:
    """Every class in train and no split empty (errors); a class missing from val or test (warning)."""
    empty = [name for name in SPLITS if splits[name].empty]
    if empty:
        raise SplitError(
            f"split: no images in {', '.join(empty)}; give some rows that split in the manifest's "
            f"split column, or leave it empty for some rows"
        )
    untrained = sorted(set(classes) - set(splits["train"]["label"]))
    if untrained:
        raise SplitError(
            f"split: classes with no training image: {', '.join(untrained)} (check the manifest's split column)"
        )
    for name in ("val", "test"):
        absent = sorted(set(classes) - set(splits[name]["label"]))
        if absent:
            log.warning("split: classes with no %s image: %s", name, ", ".join(absent))


def split_counts(splits: dict[str, pd.DataFrame]) -> dict:
    """metrics/split.json: images per split and per class per split."""
    metrics: dict = {name: len(frame) for name, frame in splits.items()}
    metrics["per_class"] = {
        name: {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
        for name, frame in splits.items()
    }
    return metrics
