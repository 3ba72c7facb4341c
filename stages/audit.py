"""audit: find wrong labels, outliers, near copies and leaks in the data, from the cached embeddings.

Reads the split files, the manifest's near-copy groups, and the chosen backbone's embeddings that the
features stage cached (models/baseline names them): nothing is decoded again. Every image of every split
gets class probabilities from a k-fold probe that never saw it (`audit.folds`), then cleanlab's Datalab
looks for label issues, outliers, near copies and class imbalance. Writes --out/: label_issues.csv,
near_duplicates.csv, outliers.csv, leaks.csv, suggested_corrections.csv (data/corrections.csv's format: copy
the rows you agree with) and a gallery PNG per finding; to --metrics the label issues and the near-copy groups
that span train and test (every count is in the stage's MLflow run). The audit informs:
it changes no split and trains nothing the model uses. A check listed in `audit.fail_on` that fails stops
the stage after the reports are written (see docs/audit.md).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.lib.audit.findings import failed_checks, findings, headline, suggested_corrections
from stages.lib.audit.gallery import captions, gallery
from stages.lib.audit.probes import load_audit_set, out_of_sample_probabilities
from stages.lib.core.errors import PipelineError
from stages.lib.core.metrics_io import flatten, write_metrics
from stages.lib.core.params import load_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.tracking import stage_run

log = logging.getLogger("audit")
TITLES = {
    "label_issues": "Label issues: given -> suggested (worst first)",
    "near_duplicates": "Near copies (signature: pixels; embedding: features)",
    "outliers": "Outliers (lowest score = most unusual)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="validate's manifest (near-copy groups)")
    parser.add_argument("--splits", type=Path, required=True, help="folder of train/val/test.csv")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared cache (gallery pixels)")
    parser.add_argument("--baseline", type=Path, required=True, help="names the chosen backbone's embeddings")
    parser.add_argument("--out", type=Path, required=True, help="folder for the reports and galleries")
    parser.add_argument("--metrics", type=Path, required=True, help="headline counts (JSON)")
    args = parser.parse_args()
    setup_stage()
    params = load_params()
    settings = params.audit

    with stage_run("audit", params):
        import mlflow

        data = load_audit_set(args.splits, args.baseline, args.manifest)
        probabilities = out_of_sample_probabilities(
            data,
            settings.folds,
            settings.C,
            settings.max_iter,
            params.base.seed,
            settings.components,
            settings.neighbours,
        )
        found = findings(data, probabilities, settings.near_duplicate_threshold, settings.label_filter)
        args.out.mkdir(parents=True, exist_ok=True)
        found.label_issues.to_csv(args.out / "label_issues.csv", index=False)
        found.near_duplicates.to_csv(args.out / "near_duplicates.csv", index=False)
        found.outliers.to_csv(args.out / "outliers.csv", index=False)
        found.leaks.to_csv(args.out / "leaks.csv", index=False)
        suggested_corrections(found, settings.outlier_score).to_csv(args.out / "suggested_corrections.csv", index=False)
        for name, items in captions(found, settings.gallery).items():
            gallery(items, data.table, args.prepared, TITLES[name], args.out / f"{name}.png")
        counts = headline(found, len(data.table), settings.outlier_score)
        # two headline numbers for `dvc exp show`; every count goes to MLflow
        write_metrics(args.metrics, {"label_issues": counts["label_issues"], "leaks": counts["leaks"]["train_test"]})
        mlflow.log_metrics({f"audit.{name}": value for name, value in flatten(counts).items()})
        mlflow.log_artifacts(str(args.out), artifact_path="audit")
        mlflow.set_tag("audit.backbone", data.backbone)

        failed = failed_checks(counts, settings.max_label_issue_fraction)
        for name, problem in failed.items():
            log.warning("audit check %s: %s", name, problem)
        blocking = [f"{name}: {problem}" for name, problem in failed.items() if name in settings.fail_on]
        if blocking:
            raise PipelineError(f"audit: {'; '.join(blocking)}. See {args.out} and docs/audit.md")
    log.info(
        "%d label issues, %d outliers, %d near-copy images, %d leaks across splits (%s)",
        counts["label_issues"],
        counts["outliers"],
        len(found.near_duplicates),
        counts["leaks"]["across_splits"],
        args.out,
    )


if __name__ == "__main__":
    main()
