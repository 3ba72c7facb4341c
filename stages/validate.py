"""validate: inspect every file under the image folder and check the set with Great Expectations.

Writes data/manifest.csv (every file: hash, size, mode, format, status ok/excluded, reason),
reports/validation/{validation.json,validation.md} and metrics/validation.json. Unusable files
are reported by name with a reason and left out; the user's files are never modified. The
stage fails (after writing the report) when a check listed in `validate.fail_on` fails.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from stages.lib import PipelineError, setup_logging
from stages.lib.checks import run_checks
from stages.lib.images import MANIFEST_COLUMNS, inspect_image, mark_duplicates, scan_image_folder
from stages.lib.params import load_params
from stages.lib.tracking import stage_run, write_metrics

log = logging.getLogger("validate")


def build_manifest(images_dir: Path, min_side: int, max_pixels: int) -> pd.DataFrame:
    """One row per file found under images_dir, inspected and de-duplicated."""
    rows = scan_image_folder(images_dir)
    for row in tqdm(rows, desc="validate", unit="file", mininterval=2):
        if row.status == "ok":
            inspect_image(row, min_side, max_pixels)
    mark_duplicates(rows)
    return pd.DataFrame([row.as_dict() for row in rows], columns=MANIFEST_COLUMNS)


def summarise(manifest: pd.DataFrame) -> dict:
    usable = manifest[manifest["status"] == "ok"]
    excluded = manifest[manifest["status"] != "ok"]
    reasons = excluded["reason"].str.split(":").str[0] if len(excluded) else pd.Series(dtype=str)
    return {
        "files": len(manifest),
        "ok": len(usable),
        "excluded": len(excluded),
        "classes": int(usable["label"].nunique()),
        "excluded_by_reason": {str(k): int(v) for k, v in reasons.value_counts().sort_index().items()},
        "ok_per_class": {str(k): int(v) for k, v in usable["label"].value_counts().sort_index().items()},
    }


def markdown_report(summary: dict, checks: list, manifest: pd.DataFrame) -> str:
    lines = ["# Validation report", "",
             f"{summary['files']} files: {summary['ok']} usable, {summary['excluded']} left out, "
             f"{summary['classes']} classes.", "", "## Checks", "", "| check | result | severity | offending |",
             "|---|---|---|---|"]
    for check in checks:
        offending = ", ".join(map(str, check.unexpected[:5])) + (" ..." if len(check.unexpected) > 5 else "")
        lines.append(f"| {check.name} ({check.expectation}) | {'pass' if check.success else 'FAIL'} "
                     f"| {check.severity} | {offending} |")
    lines += ["", "## Usable images per class", "", "| class | images |", "|---|---|"]
    lines += [f"| {label} | {count} |" for label, count in summary["ok_per_class"].items()]
    excluded = manifest[manifest["status"] != "ok"]
    lines += ["", "## Files left out", ""]
    lines += [f"- `{row.path}`: {row.reason}" for row in excluded.itertuples()] or ["None."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="CSV to write: one row per file")
    parser.add_argument("--reports", type=Path, required=True, help="folder for validation.json/.md")
    parser.add_argument("--metrics", type=Path, required=True, help="DVC metrics JSON to write")
    args = parser.parse_args()
    setup_logging()
    params = load_params()
    settings = params.validate_

    with stage_run("validate", params, ["data", "validate"]) as run:
        manifest = build_manifest(Path(params.data.images_dir), settings.min_side, settings.max_pixels)
        args.manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.to_csv(args.manifest, index=False)
        summary = summarise(manifest)
        checks = run_checks(manifest, settings) if summary["ok"] else []

        args.reports.mkdir(parents=True, exist_ok=True)
        report = {"summary": summary, "checks": [check.as_dict() for check in checks], "mlflow_run_id": run.info.run_id}
        (args.reports / "validation.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (args.reports / "validation.md").write_text(markdown_report(summary, checks, manifest))
        write_metrics(args.metrics, {k: summary[k] for k in ("files", "ok", "excluded", "classes")}
                      | {"excluded_by_reason": summary["excluded_by_reason"]})
        import mlflow
        mlflow.log_artifacts(str(args.reports), artifact_path="validation")
        mlflow.log_artifact(str(args.manifest))

        for check in checks:
            if not check.success:
                log.warning("check %s failed (%s): %s", check.name, check.severity, check.unexpected[:5])
        failures = [check.name for check in checks if not check.success and check.severity == "error"]
        if summary["ok"] == 0:
            failures.append("no usable images")
        if failures:
            raise PipelineError(f"validate: data cannot be used ({', '.join(sorted(set(failures)))}); "
                             f"see {args.reports / 'validation.md'}")
    log.info("%d usable images in %d classes, %d files left out", summary["ok"], summary["classes"], summary["excluded"])


if __name__ == "__main__":
    main()
