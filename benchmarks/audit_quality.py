"""How well validate's near-copy groups and the audit find what is wrong, on sets with known defects.

    python benchmarks/audit_quality.py [--fonts 174] [--skip-digits]

Two sets, neither in the tests:
- letters in fonts (benchmarks/letters.py): 130 near copies (cropped, resized, JPEG, brighter or darker),
  5.5 % wrong labels, 12 strays from another set;
- the demo digits (python -m stages.demo_data), which are clean.
Each goes through the pipeline's own code: validate's `build_manifest` (signatures and groups at the params'
defaults), the split, embeddings of every image from the first features candidate (tf_efficientnet_lite0,
offline weights) at `model.image_size` with `features.fusion_stages`, as the features stage computes them,
and the audit (k-fold probes, cleanlab's Datalab) at the params' defaults. Prints the issue's measured goals
and appends rows to benchmarks/measured/audit_quality.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from letters import write_letters  # noqa: E402  (benchmarks/letters.py, beside this script)

from stages.lib.audit.findings import findings  # noqa: E402
from stages.lib.audit.probes import AuditSet, out_of_sample_probabilities  # noqa: E402
from stages.lib.core.params import load_params  # noqa: E402
from stages.lib.data.manifest import build_manifest, scan_image_folder  # noqa: E402
from stages.lib.data.splits import SPLITS, split_manifest  # noqa: E402

MEASURED = ROOT / "benchmarks" / "measured" / "audit_quality.csv"


def embeddings(paths: list[str], params) -> np.ndarray:
    """The features stage's embeddings of these files (first candidate, its weights, fusion stages)."""
    import torch

    from stages.lib.data.preprocessing import decode, for_backbone
    from stages.lib.model.backbones import create_backbone
    from stages.lib.training.probe import extract_embeddings

    candidate = params.features.candidates[0]
    size, interpolation = params.model.image_size, params.model.interpolation
    images = np.stack([decode(path, size, interpolation) for path in paths])
    torch.manual_seed(params.base.seed)
    model = create_backbone(candidate.name, candidate.weights)
    config = for_backbone(candidate.name, size, interpolation)
    return extract_embeddings(model, images, config.mean, config.std, 128, params.features.fusion_stages)


def run(folder: Path, params) -> tuple[pd.DataFrame, dict, object, float]:
    """validate -> split -> embeddings -> audit; returns the manifest, the splits, the findings, audit seconds."""
    manifest = build_manifest(
        scan_image_folder(folder), 8, 40_000_000, workers=None, near_duplicates=params.validate_.near_duplicates
    )
    splits = split_manifest(manifest, params.split, params.base.seed)
    table = pd.concat([splits[name].assign(split=name) for name in SPLITS], ignore_index=True)
    table["row"] = table.groupby("split").cumcount()
    table["group"] = table["path"].map(manifest.set_index("path")["group"]).fillna("")
    features = embeddings(list(table["path"]), params)
    classes = sorted(set(table["label"]))
    data = AuditSet(
        table=table,
        features=features,
        labels=table["label"].map(classes.index).to_numpy(),
        classes=classes,
        backbone=params.features.candidates[0].name,
    )
    started = time.perf_counter()
    settings = params.audit
    probabilities = out_of_sample_probabilities(
        data, settings.folds, settings.C, settings.max_iter, params.base.seed, settings.components
    )
    found = findings(data, probabilities, settings.near_duplicate_threshold)
    return manifest, splits, found, time.perf_counter() - started


def letters_rows(fonts: int, params) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench-letters-") as temporary:
        folder = Path(temporary) / "letters"
        truth = write_letters(folder, fonts=fonts)
        truth["path"] = [(folder / path).as_posix() for path in truth["path"]]
        truth["copy_of"] = [(folder / path).as_posix() if path else "" for path in truth["copy_of"]]
        manifest, splits, found, seconds = run(folder, params)
    images = len(truth)
    group = manifest.set_index("path")["group"]
    where = {path: name for name in SPLITS for path in splits[name]["path"]}
    copies = truth[truth["kind"] == "copy"]
    grouped = sum(bool(group[c]) and group[c] == group[o] for c, o in zip(copies["path"], copies["copy_of"]))
    across = sum(
        where.get(c, "") != where.get(o, "")
        for c, o in zip(copies["path"], copies["copy_of"])
        if c in where and o in where
    )
    sizes = manifest[manifest["group"] != ""].groupby("group").size()
    usable = sum(len(frame) for frame in splits.values())
    status = manifest.set_index("path")["reason"]
    wrong_all = set(truth.loc[truth["kind"] == "wrong", "path"])
    conflicts = {path for path, reason in status.items() if reason.startswith("label conflict")}
    wrong = wrong_all & set(where)
    flagged = set(found.label_issues["path"])
    strays = set(truth.loc[truth["kind"] == "stray", "path"])
    top25 = set(found.outliers["path"].head(25))
    return [
        row("letters", "near-copy pairs grouped", grouped / len(copies), ">= 0.95", images),
        row("letters", "near-copy pairs across splits", across, "0", images),
        row("letters", "images in a near-copy group", round(float(sizes.sum()) / images, 3), "", images),
        row("letters", "largest group (images)", int(sizes.max()) if len(sizes) else 0, "<= max_group_size", images),
        row("letters", "val share", len(splits["val"]) / usable, "0.15 +- 0.03", images),
        row("letters", "test share", len(splits["test"]) / usable, "0.15 +- 0.03", images),
        row(
            "letters",
            "wrong labels left out by validate (conflicts)",
            len(wrong_all & conflicts) / len(wrong_all),
            "",
            images,
        ),
        row("letters", "right labels left out with them", len(conflicts - wrong_all), "", images),
        row(
            "letters",
            "wrong labels kept, flagged by the audit (recall)",
            len(flagged & wrong) / max(len(wrong), 1),
            ">= 0.85",
            images,
        ),
        row(
            "letters", "flagged truly wrong (precision)", len(flagged & wrong) / max(len(flagged), 1), ">= 0.80", images
        ),
        row("letters", "strays among the 25 lowest outlier scores", len(top25 & strays), ">= 10 of 12", images),
        row("letters", "audit seconds (probes + Datalab)", seconds, "", images),
    ]


def digits_rows(params) -> list[dict]:
    from stages.demo_data import write_digits

    with tempfile.TemporaryDirectory(prefix="bench-digits-") as temporary:
        folder = Path(temporary) / "digits"
        write_digits(folder)
        manifest, splits, found, seconds = run(folder, params)
    images = sum(len(frame) for frame in splits.values())
    return [
        row("digits", "near-copy groups", int(manifest.loc[manifest["group"] != "", "group"].nunique()), "", images),
        row("digits", "flagged as label issues (fraction)", len(found.label_issues) / images, "<= 0.01", images),
        row("digits", "audit seconds (probes + Datalab)", seconds, "", images),
    ]


def row(dataset: str, measure: str, value: float, goal: str, images: int) -> dict:
    return {"dataset": dataset, "images": images, "measure": measure, "value": round(float(value), 3), "goal": goal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fonts", type=int, default=174)
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    rows = letters_rows(args.fonts, params) + ([] if args.skip_digits else digits_rows(params))
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    for item in rows:
        item |= {"load_1_5_15_min": load, "date": datetime.date.today().isoformat()}
        print(f"{item['dataset']:8} {item['measure']:45} {item['value']:>8} {item['goal']}")
    new = not MEASURED.exists()
    with MEASURED.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
