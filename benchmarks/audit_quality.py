"""How well validate's near-copy groups and the audit find what is wrong, on sets with known defects.

    python benchmarks/audit_quality.py [--fonts 174] [--skip-digits] [--compare]

Sets the tests do not contain:
- letters in fonts (benchmarks/letters.py): 130 near copies (cropped, resized, JPEG, brighter or darker),
  5.5 % wrong labels, 12 strays from another set;
- the demo digits (python -m stages.demo_data), which are clean, and the same digits with 5 % of the labels
  moved to another class.
Each goes through the pipeline's own code: validate's `build_manifest`, the split, embeddings of every image
from the first features candidate (tf_efficientnet_lite0, offline weights) at `model.image_size` with
`features.fusion_stages`, as the features stage computes them, and the audit (k-fold probes, cleanlab's
Datalab) at the params' defaults. The letters go through validate twice: at its defaults for the near-copy
rows, and with `near_duplicates.method: none` for the audit's rows, so that validate leaves out no wrong label
as a conflict and the audit is measured on all of them. `--compare` adds the audit's rows with cleanlab's default
label filter (prune_by_noise_rate, the default before prune_by_class), with the logistic probe alone on 128
principal components and that filter (the defaults before the nearest-neighbour probe), alone on every
dimension, and with 40 neighbours instead of 20. Prints the
measured goals and appends rows to benchmarks/measured/audit_quality.csv.
"""

from __future__ import annotations

import argparse
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
from machine import append_measured  # noqa: E402

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


def prepare(folder: Path, params, method: str | None = None) -> tuple[pd.DataFrame, dict, AuditSet]:
    """validate -> split -> embeddings: the manifest, the splits and the audit's input (method: validate's
    near-copy method instead of the params')."""
    near_duplicates = params.validate_.near_duplicates
    if method:
        near_duplicates = near_duplicates.model_copy(update={"method": method})
    manifest = build_manifest(scan_image_folder(folder), 8, 40_000_000, workers=None, near_duplicates=near_duplicates)
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
    return manifest, splits, data


def audit(data: AuditSet, params, labels: np.ndarray | None = None):
    """The audit's findings at the params' `audit` settings (labels: given instead of data.labels), seconds."""
    if labels is not None:
        table = data.table.assign(label=np.asarray(data.classes)[labels])
        data = AuditSet(table=table, features=data.features, labels=labels, classes=data.classes, backbone="")
    started = time.perf_counter()
    settings, seed = params.audit, params.base.seed
    probabilities = out_of_sample_probabilities(
        data, settings.folds, settings.C, settings.max_iter, seed, settings.components, settings.neighbours
    )
    found = findings(data, probabilities, settings.near_duplicate_threshold, settings.label_filter)
    return found, time.perf_counter() - started


def probes(params) -> str:
    """The probes the audit ran and cleanlab's label filter, for the rows: 'logistic + 20 neighbours, all
    dims' (and '; prune_by_noise_rate' where the filter is not prune_by_class)."""
    settings = params.audit
    neighbours = f" + {settings.neighbours} neighbours" if settings.neighbours else ""
    dims = f"{settings.components} components" if settings.components else "all dims"
    label_filter = f"; {settings.label_filter}" if settings.label_filter != "prune_by_class" else ""
    return f"logistic{neighbours}, {dims}{label_filter}"


def letters_rows(fonts: int, settings: list) -> list[dict]:
    params = settings[0]
    with tempfile.TemporaryDirectory(prefix="bench-letters-") as temporary:
        folder = Path(temporary) / "letters"
        truth = write_letters(folder, fonts=fonts)
        truth["path"] = [(folder / path).as_posix() for path in truth["path"]]
        truth["copy_of"] = [(folder / path).as_posix() if path else "" for path in truth["copy_of"]]
        manifest, splits, _ = prepare(folder, params)
        _, _, everything = prepare(folder, params, method="none")  # validate leaves no wrong label out
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
    wrong = set(truth.loc[truth["kind"] == "wrong", "path"])
    conflicts = {path for path, reason in status.items() if reason.startswith("label conflict")}
    rows = [
        row("letters", "near-copy pairs grouped", grouped / len(copies), ">= 0.95", images),
        row("letters", "near-copy pairs across splits", across, "0", images),
        row("letters", "images in a near-copy group", round(float(sizes.sum()) / images, 3), "", images),
        row("letters", "largest group (images)", int(sizes.max()) if len(sizes) else 0, "<= max_group_size", images),
        row("letters", "val share", len(splits["val"]) / usable, "0.15 +- 0.03", images),
        row("letters", "test share", len(splits["test"]) / usable, "0.15 +- 0.03", images),
        row(
            "letters", "wrong labels left out by validate (conflicts)", len(wrong & conflicts) / len(wrong), "", images
        ),
        row("letters", "right labels left out with them", len(conflicts - wrong), "", images),
    ]
    strays = set(truth.loc[truth["kind"] == "stray", "path"])
    for setting in settings:
        found, seconds = audit(everything, setting)
        flagged, kept = set(found.label_issues["path"]), wrong & set(everything.table["path"])
        images = len(everything.table)
        rows += [
            row("letters", "wrong labels flagged (recall; validate: method none)", len(flagged & kept) / len(wrong)),
            row("letters", "flagged truly wrong (precision)", len(flagged & kept) / max(len(flagged), 1)),
            row("letters", "strays among the 25 lowest outlier scores", len(set(found.outliers["path"][:25]) & strays)),
            row("letters", "audit seconds (probes + Datalab)", seconds),
        ]
        for item, goal in zip(rows[-4:], (">= 0.85", ">= 0.80", ">= 10 of 12", "")):
            item |= {"images": images, "goal": goal, "probes": probes(setting)}
    return rows


def digits_rows(settings: list, swapped: float = 0.05) -> list[dict]:
    from stages.demo_data import write_digits

    with tempfile.TemporaryDirectory(prefix="bench-digits-") as temporary:
        folder = Path(temporary) / "digits"
        write_digits(folder)
        manifest, _, data = prepare(folder, settings[0])
    images = len(data.table)
    rows = [
        row("digits", "near-copy groups", int(manifest.loc[manifest["group"] != "", "group"].nunique()), "", images)
    ]
    rng = np.random.default_rng(0)
    moved = rng.choice(images, round(swapped * images), replace=False)
    labels = data.labels.copy()
    labels[moved] = (labels[moved] + rng.integers(1, len(data.classes), len(moved))) % len(data.classes)
    wrong = set(data.table["path"].iloc[moved])
    for setting in settings:
        found, seconds = audit(data, setting)
        flagged = set(audit(data, setting, labels)[0].label_issues["path"])
        named = f"digits, {swapped:.0%} moved"
        rows += [
            row("digits", "flagged as label issues (fraction)", len(found.label_issues) / images, "<= 0.01", images),
            row("digits", "audit seconds (probes + Datalab)", seconds, "", images),
            row(named, "wrong labels flagged (recall)", len(flagged & wrong) / len(wrong), ">= 0.85", images),
            row(
                named, "flagged truly wrong (precision)", len(flagged & wrong) / max(len(flagged), 1), ">= 0.80", images
            ),
        ]
        for item in rows[-4:]:
            item["probes"] = probes(setting)
    return rows


def row(dataset: str, measure: str, value: float, goal: str = "", images: int = 0) -> dict:
    return {
        "dataset": dataset,
        "images": images,
        "measure": measure,
        "value": round(float(value), 3),
        "goal": goal,
        "probes": "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fonts", type=int, default=174)
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--compare", action="store_true", help="also the probes before, and one change at a time")
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    settings = [params]
    if args.compare:  # the defaults before, then one change at a time
        for change in (
            {"label_filter": "prune_by_noise_rate"},
            {"neighbours": 0, "components": 128, "label_filter": "prune_by_noise_rate"},
            {"neighbours": 0},
            {"neighbours": 40},
        ):
            settings.append(params.model_copy(update={"audit": params.audit.model_copy(update=change)}))
    rows = letters_rows(args.fonts, settings) + ([] if args.skip_digits else digits_rows(settings))
    for item in append_measured(MEASURED, rows):
        print(f"{item['dataset']:16} {item['measure']:52} {item['value']:>8} {item['goal']:12} {item['probes']}")


if __name__ == "__main__":
    main()
