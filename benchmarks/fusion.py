"""Fusion heads on the chosen backbone's cached embeddings: val and test accuracy per mode and seed.

    python benchmarks/fusion.py [--project .] [--seeds 42 1 2] [--out benchmarks/results/fusion_probe.csv]

Needs a project whose `features` stage has run (the baseline's card names the embeddings file
of the chosen backbone; params.yaml gives `features.fusion_stages` and `features.fusion_head`).
Per seed (the head's initialisation and batch order; the split is the project's): the logistic probe
on the pre-logits features only (`logreg_prelogits`, no fusion), the logistic probe on the
concatenated sources (`logreg`, today's fused baseline), and a torch fusion head of each mode
(`concat`, `gated`, `attention`, trained exactly as the features stage trains it: val early stopping).
Test is only reported here; nothing is chosen by it. Prints mean ± std per head and writes one row
per (head, seed) with val/test accuracy and seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.lib.core.params import load_params  # noqa: E402
from stages.lib.model.card import BaselineCard  # noqa: E402
from stages.lib.training.fusion_training import train_fusion_head  # noqa: E402
from stages.lib.training.probe import fit_probe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["concat", "gated", "attention"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fusion_probe.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.project / "params.yaml")
    settings = params.features
    probe = BaselineCard.read(args.project / "models/baseline").model_dump()
    with np.load(args.project / probe["features"]) as stored:
        arrays = {name: stored[name] for name in stored.files}
    dims = [probe["classifier_dim"]]
    sources = (probe.get("fusion") or {}).get("sources")
    if sources is None:  # the sources' widths from the backbone
        from stages.lib.model.backbones import create_backbone
        from stages.lib.model.fusion import source_dims

        sources = source_dims(create_backbone(probe["model"], "none", len(probe["classes"])), settings.fusion_stages)
    assert sum(sources) == arrays["train_x"].shape[1] and sources[0] == dims[0]
    rows = []
    for seed in args.seeds:
        for name, columns in (("logreg_prelogits", dims[0]), ("logreg", arrays["train_x"].shape[1])):
            started = time.perf_counter()
            fitted = fit_probe(
                arrays["train_x"][:, :columns],
                arrays["train_y"],
                arrays["val_x"][:, :columns],
                arrays["val_y"],
                settings.C,
                settings.max_iter,
                seed,
            )
            test = (fitted.head.logits(arrays["test_x"][:, :columns]).argmax(1) == arrays["test_y"]).mean()
            rows.append(
                {
                    "head": name,
                    "seed": seed,
                    "val_accuracy": fitted.val_accuracy,
                    "test_accuracy": float(test),
                    "seconds": round(time.perf_counter() - started, 2),
                }
            )
        for mode in args.modes:
            head, summary = train_fusion_head(
                arrays, sources, len(probe["classes"]), mode, settings.fusion_head, params.model.drop_rate, seed
            )
            with torch.no_grad():
                test = (head(torch.from_numpy(arrays["test_x"]).float()).argmax(1).numpy() == arrays["test_y"]).mean()
            rows.append(
                {
                    "head": mode,
                    "seed": seed,
                    "val_accuracy": summary.val_accuracy,
                    "test_accuracy": float(test),
                    "seconds": summary.seconds,
                    "best_epoch": summary.best_epoch,
                    "parameters": summary.parameters,
                }
            )
        print(rows[-len(args.modes) - 2 :], flush=True)
    import pandas as pd

    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"{probe['model']}, {settings.fusion_stages} stages, seeds {args.seeds}")
    for head, group in table.groupby("head", sort=False):
        describe = lambda column, rows=group: (
            f"{100 * statistics.mean(rows[column]):.2f} ± {100 * statistics.pstdev(rows[column]):.2f}"
        )
        print(
            f"{head:18s} val {describe('val_accuracy')}  test {describe('test_accuracy')}  "
            f"{statistics.mean(group['seconds']):.1f} s"
        )


if __name__ == "__main__":
    main()
