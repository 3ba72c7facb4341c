"""validate: inspect every file of the data set and check the set with Great Expectations.

Reads the image folder `data.images_dir/<class>/...`, or the CSV manifest `data.manifest`
(path,label[,split]), applies the user's --corrections (exclude or relabel, recorded in the manifest)
and groups near copies by a perceptual signature (params `validate.near_duplicates`). Writes
data/manifest.csv (every file: hash, size, mode, format, status ok/excluded, reason, note, near-copy
group), reports/validation/{validation.json,validation.md,gx_results.json} and metrics/validation.json.
Unusable files are reported by name with a reason and left out; the user's files are never modified.
The stage fails, after writing the report, when a check listed in `validate.fail_on` fails or fewer than
two classes are usable.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from stages.lib.core.errors import PipelineError
from stages.lib.core.metrics_io import write_metrics
from stages.lib.core.parallel import worker_count
from stages.lib.core.params import load_params
from stages.lib.core.stage import setup_stage
from stages.lib.core.tracking import stage_run
from stages.lib.data.checks import blocking_problems, group_split_check, markdown_report, run_checks, summarise
from stages.lib.data.corrections import read_corrections
from stages.lib.data.manifest import build_manifest, list_files

log = logging.getLogger("validate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="CSV to write: one row per file")
    parser.add_argument("--reports", type=Path, required=True, help="folder for validation.json/.md, gx_results.json")
    parser.add_argument("--metrics", type=Path, required=True, help="DVC metrics JSON to write")
    parser.add_argument("--corrections", type=Path, help="the user's corrections CSV (path,action,label,note)")
    args = parser.parse_args()
    setup_stage()
    params = load_params()
    settings = params.validate_

    with stage_run("validate", params):
        import mlflow

        workers = worker_count(settings.workers)
        log.info("inspecting files with %d worker processes", workers)
        corrections = read_corrections(args.corrections) if args.corrections else []
        manifest = build_manifest(
            list_files(params.data),
            settings.min_side,
            settings.max_pixels,
            workers,
            near_duplicates=settings.near_duplicates,
            corrections=corrections,
            images_dir=params.data.images_dir,
        )
        args.manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.to_csv(args.manifest, index=False)
        summary = summarise(manifest)
        checks, gx_results = run_checks(manifest, settings) if summary["ok"] else ([], [])
        checks.append(group_split_check(manifest, settings))

        args.reports.mkdir(parents=True, exist_ok=True)
        report = {"summary": summary, "checks": [check.as_dict() for check in checks]}
        (args.reports / "validation.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (args.reports / "gx_results.json").write_text(json.dumps(gx_results, indent=2, default=str) + "\n")
        (args.reports / "validation.md").write_text(markdown_report(summary, checks, manifest))
        write_metrics(args.metrics, {"images": {"usable": summary["ok"], "excluded": summary["excluded"]}})
        mlflow.log_metrics(
            {
                "images.files": summary["files"],
                "images.excluded_fraction": summary["excluded_fraction"],
                "classes": summary["classes"],
                "near_copy_groups": summary["near_copy_groups"],
            }
        )
        mlflow.log_artifacts(str(args.reports), artifact_path="validation")
        mlflow.log_artifact(str(args.manifest))

        for check in checks:
            if not check.success:
                log.warning("check %s failed (%s): %s", check.name, check.severity, check.unexpected[:5])
        problems = blocking_problems(summary, checks)
        if problems:
            raise PipelineError(
                f"validate: the data cannot be used: {'; '.join(problems)}. See {args.reports / 'validation.md'}"
            )
    log.info(
        "%d usable images in %d classes, %d files left out %s",
        summary["ok"],
        summary["classes"],
        summary["excluded"],
        summary["excluded_by_reason"],
    )


if __name__ == "__main__":
    main()
