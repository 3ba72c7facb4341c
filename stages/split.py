"""split: stratified, seeded, leak-free train/val/test lists from the manifest's usable images.

Images with identical content (same sha256) are one group and land in one split together, so
no test image has a copy in training. Writes data/splits/{train,val,test}.csv (path, label)
and metrics/split.json (counts per split and per class).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from stages.lib import PipelineError, setup_logging
from stages.lib.images import read_labelled_csv
from stages.lib.params import Split, load_params
from stages.lib.tracking import stage_run, write_metrics

log = logging.getLogger("split")
SPLITS = ("train", "val", "test")


def check_class_sizes(groups: pd.DataFrame, settings: Split) -> None:
    """Each class needs at least one content group in every split; say which class cannot."""
    smallest_share = min(settings.val_size, settings.test_size, 1 - settings.val_size - settings.test_size)
    needed = max(3, int(-(-1 // smallest_share)))  # ceil(1 / smallest share)
    counts = groups["label"].value_counts()
    too_small = counts[counts < needed]
    if len(too_small):
        listed = ", ".join(f"{label} ({count})" for label, count in too_small.items())
        raise PipelineError(f"split: classes too small for val_size={settings.val_size}, "
                         f"test_size={settings.test_size} (need {needed} distinct images each): {listed}")


def split_manifest(manifest: pd.DataFrame, settings: Split, seed: int) -> dict[str, pd.DataFrame]:
    """Usable rows -> {'train','val','test'}: stratified by label, grouped by content hash."""
    usable = manifest[manifest["status"] == "ok"]
    groups = usable.drop_duplicates("sha256")[["sha256", "label"]]
    if settings.max_per_class:
        groups = groups.sample(frac=1.0, random_state=seed).groupby("label").head(settings.max_per_class)
    groups = groups.sort_values("sha256").reset_index(drop=True)
    check_class_sizes(groups, settings)
    rest, test = train_test_split(groups, test_size=settings.test_size, stratify=groups["label"], random_state=seed)
    val_share = settings.val_size / (1 - settings.test_size)
    train, val = train_test_split(rest, test_size=val_share, stratify=rest["label"], random_state=seed)
    return {name: usable[usable["sha256"].isin(part["sha256"])][["path", "label", "sha256"]]
            .sort_values("path").reset_index(drop=True)
            for name, part in zip(SPLITS, (train, val, test))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for train/val/test.csv")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    setup_logging()
    params = load_params()

    with stage_run("split", params, ["base", "split"], upstream=["validate"]):
        splits = split_manifest(read_labelled_csv(args.manifest), params.split, params.base.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, frame in splits.items():
            frame.to_csv(args.out / f"{name}.csv", index=False)
        metrics = {name: len(frame) for name, frame in splits.items()}
        metrics["per_class"] = {name: {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
                                for name, frame in splits.items()}
        write_metrics(args.metrics, metrics)
    log.info("train %d, val %d, test %d images", *(len(splits[name]) for name in SPLITS))


if __name__ == "__main__":
    main()
