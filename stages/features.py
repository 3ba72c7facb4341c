"""features: the feature-extraction baseline. Frozen pretrained backbone -> pooled embeddings
-> logistic regression tuned on val.

Writes data/features/<model>.npz (embeddings and labels per split), models/baseline/
(the probe as a linear head on raw embeddings: the starting head for fine-tuning) and
metrics/baseline.json (val and test accuracy, macro F1).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from stages.lib import setup_logging
from stages.lib.backbones import create_backbone, data_config
from stages.lib.metrics import classification_metrics, softmax
from stages.lib.params import load_params
from stages.lib.prepared import load_meta, load_split
from stages.lib.probe import extract_embeddings, fit_probe, probe_logits
from stages.lib.tracking import stage_run, write_metrics

log = logging.getLogger("features")
SPLITS = ("train", "val", "test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the cached embeddings")
    parser.add_argument("--baseline", type=Path, required=True, help="folder for the probe head")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    setup_logging()
    params = load_params()
    torch.manual_seed(params.base.seed)

    with stage_run("features", params, ["base", "model", "features"], upstream=["augment"]):
        meta = load_meta(args.prepared)
        config = data_config(params.model.name, meta["image_size"])
        backbone = create_backbone(params.model.name, params.model.weights, num_classes=len(meta["classes"]))
        embeddings, labels = {}, {}
        for split in SPLITS:
            images, labels[split] = load_split(args.prepared, split)
            embeddings[split] = extract_embeddings(backbone, images, config["mean"], config["std"],
                                                   params.features.batch_size)
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(args.out / f"{params.model.name}.npz",
                 **{f"{split}_x": embeddings[split] for split in SPLITS}, **{f"{split}_y": labels[split] for split in SPLITS})

        probe = fit_probe(embeddings["train"], labels["train"], embeddings["val"], labels["val"],
                          params.features.C, params.features.max_iter, params.base.seed)
        test_probabilities = softmax(probe_logits(embeddings["test"], probe["weight"], probe["bias"]))
        test = classification_metrics(labels["test"], test_probabilities)

        args.baseline.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": torch.from_numpy(probe["weight"]), "bias": torch.from_numpy(probe["bias"])},
                   args.baseline / "head.pt")
        (args.baseline / "probe.json").write_text(json.dumps({
            "model": params.model.name, "weights": params.model.weights, "classes": meta["classes"],
            "embedding_dim": int(embeddings["train"].shape[1]), "C": probe["C"], "grid": probe["grid"],
            "features": str(args.out / f"{params.model.name}.npz"), "data_config": config}, indent=2) + "\n")
        write_metrics(args.metrics, {"val_accuracy": probe["val_accuracy"], "test_accuracy": test["accuracy"],
                                     "test_macro_f1": test["macro_f1"], "C": probe["C"]})
    log.info("linear probe on %s: val %.4f, test %.4f (C=%s)", params.model.name,
             probe["val_accuracy"], test["accuracy"], probe["C"])


if __name__ == "__main__":
    main()
