"""augment: decode and resize every split once into data/prepared/, and preview the augmentation.

The cache holds uint8 arrays at `model.image_size`, resized with `model.interpolation` (the
preprocessing contract's decoder, the same that serves encoded files later): one cache for every
candidate backbone of the features stage. With `augment.oversample` the
cache also holds a class-balanced training index (train_index.npy). The online augmentation
policy (`augment` params) is applied later by the trainer; reports/augment_preview.png shows
what the model will see.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from stages.lib.core.parallel import worker_count
from stages.lib.core.params import load_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.tracking import stage_run
from stages.lib.data.images import read_labelled_csv
from stages.lib.data.prepared import create_images, decode_into, oversampled_index, save_labels, save_train_index

log = logging.getLogger("augment")
SPLITS = ("train", "val", "test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=Path, required=True, help="folder with train/val/test.csv")
    parser.add_argument("--out", type=Path, required=True, help="the prepared cache folder")
    parser.add_argument("--preview", type=Path, required=True, help="PNG grid of augmented images")
    args = parser.parse_args()
    setup_stage()
    params = load_params()

    with stage_run("augment", params):
        import mlflow

        size, interpolation = params.model.image_size, params.model.interpolation
        frames = {split: read_labelled_csv(args.splits / f"{split}.csv") for split in SPLITS}
        classes = sorted(set(frames["train"]["label"]))
        index_of = {label: i for i, label in enumerate(classes)}
        args.out.mkdir(parents=True, exist_ok=True)
        workers = worker_count(params.augment.workers)
        log.info("decoding %d images with %d worker processes", sum(map(len, frames.values())), workers)
        for split, frame in frames.items():
            images, labels = create_images(args.out, split, len(frame), size), frame["label"].map(index_of).to_numpy()
            decode_into(images, frame["path"].tolist(), interpolation, workers)
            save_labels(args.out, split, labels)
            if split == "train":
                train_images, train_labels = images, labels
        meta = {
            "classes": classes,
            "image_size": size,
            "interpolation": interpolation,
            "counts": {split: len(frame) for split, frame in frames.items()},
            "oversampled": False,
        }
        index = None
        if params.augment.oversample:
            index = oversampled_index(train_labels, params.base.seed)
            save_train_index(args.out, index)
            meta |= {"oversampled": True, "train_samples_per_epoch": len(index)}
            log.info("oversampling: %d training samples per epoch from %d images", len(index), len(train_labels))
        (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

        from stages.lib.data.augmentation import preview_grid, train_transform  # torch: only for the preview

        args.preview.parent.mkdir(parents=True, exist_ok=True)
        preview_grid(
            train_images,
            train_transform(params.augment),
            params.augment.preview_images,
            args.preview,
            params.base.seed,
            indexes=index,
        )
        mlflow.log_artifact(str(args.preview))
        mlflow.log_dict(meta, "prepared_meta.json")
        mlflow.log_metrics(
            {f"images.{split}": count for split, count in meta["counts"].items()}
            | {"images.train_per_epoch": len(index) if index is not None else meta["counts"]["train"]}
        )
    log.info("cached %s images at %dpx in %s", meta["counts"], size, args.out)


if __name__ == "__main__":
    main()
