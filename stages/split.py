"""split: stratified, seeded, leak-free train/val/test lists from the manifest's usable images.

Images with identical content (same sha256) land in one split together, so no test image has a
copy in training. A `split` column given in a CSV manifest (train/val/test) is honoured; rows
without one are split by `split.val_size` / `split.test_size`. Writes
data/splits/{train,val,test}.csv (path, label, sha256) and metrics/split.json (counts per split
and per class).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from stages.lib.core.metrics_io import write_metrics
from stages.lib.core.params import load_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.tracking import stage_run
from stages.lib.data.images import read_labelled_csv
from stages.lib.data.splits import SPLITS, split_counts, split_manifest

log = logging.getLogger("split")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for train/val/test.csv")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    setup_stage()
    params = load_params()

    with stage_run("split", params):
        import mlflow

        splits = split_manifest(read_labelled_csv(args.manifest), params.split, params.base.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, frame in splits.items():
            frame.to_csv(args.out / f"{name}.csv", index=False)
        counts = split_counts(splits)
        # headline numbers for `dvc exp show`; per-class counts beside the splits (class names may hold
        # characters MLflow refuses in metric names, so MLflow gets them as a JSON artifact)
        write_metrics(args.metrics, {name: counts[name] for name in SPLITS})
        (args.out / "counts.json").write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
        mlflow.log_dict(counts, "split_counts.json")
    log.info("train %d, val %d, test %d images", *(len(splits[name]) for name in SPLITS))


if __name__ == "__main__":
    main()
