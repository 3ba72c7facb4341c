"""Great Expectations checks on the image manifest.

Three small tables are validated, each by its own expectations:
- `images`: the usable (status ok) rows: labels present and in the expected set, sizes in bounds,
  content hashes unique;
- `classes`: one row per class with its usable image count (minimum per class);
- `summary`: one row with the class-imbalance ratio and the fraction of files left out.
Every check has a name; `validate.fail_on` in params lists the names that fail the stage,
the others only warn. `summarise` and `markdown_report` turn the manifest and the results into
the counts (metrics/validation.json) and the report a person reads (reports/validation/).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd

from stages.lib.core.params import Validate
from stages.lib.data.images import REASONS, reason_code

NOT_DATA = ("hidden or OS file", "symlink loop")  # left out, but not images a user lost: not in the fraction


@dataclass
class CheckResult:
    name: str
    table: str
    success: bool
    severity: str  # "error" fails the stage, "warning" is reported only
    expectation: str
    details: dict
    unexpected: list

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _expectations(table: str, settings: Validate) -> list[tuple[str, object]]:
    """(check name, expectation) pairs for one table, from the validate params."""
    import great_expectations.expectations as gxe

    if table == "images":
        pairs = [
            ("label_set", gxe.ExpectColumnValueLengthsToBeBetween(column="label", min_value=1)),
            ("image_size", gxe.ExpectColumnValuesToBeBetween(column="width", min_value=settings.min_side)),
            ("image_size", gxe.ExpectColumnValuesToBeBetween(column="height", min_value=settings.min_side)),
            ("unique_content", gxe.ExpectColumnValuesToBeUnique(column="sha256")),
        ]
        if settings.classes:
            pairs.append(
                ("label_set", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(settings.classes)))
            )
        return pairs
    if table == "classes":
        return [
            (
                "min_images_per_class",
                gxe.ExpectColumnValuesToBeBetween(column="images", min_value=settings.min_images_per_class),
            )
        ]
    return [
        (
            "max_imbalance_ratio",
            gxe.ExpectColumnValuesToBeBetween(column="imbalance_ratio", max_value=settings.max_imbalance_ratio),
        ),
        (
            "max_excluded_fraction",
            gxe.ExpectColumnValuesToBeBetween(column="excluded_fraction", max_value=settings.max_excluded_fraction),
        ),
    ]


def class_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per class (every label of a file that is not hidden or OS litter): usable and left-out files.

    A class whose every file was left out is listed with 0 usable images, so it fails
    min_images_per_class instead of vanishing.
    """
    counted = manifest[(manifest["label"] != "") & (manifest["reason"].map(reason_code) != "hidden or OS file")]
    ok = (counted["status"] == "ok").groupby(counted["label"]).sum()
    total = counted.groupby("label").size()
    return pd.DataFrame(
        {
            "label": total.index.astype(str),
            "images": ok.reindex(total.index).to_numpy(dtype=int),
            "excluded": (total - ok.reindex(total.index)).to_numpy(dtype=int),
        }
    )


def excluded_fraction(manifest: pd.DataFrame) -> float:
    """The share of candidate files left out; hidden/OS files and symlink loops are not candidates."""
    candidates = manifest[~manifest["reason"].map(reason_code).isin(NOT_DATA)]
    return round(float((candidates["status"] != "ok").mean()), 4) if len(candidates) else 0.0


def manifest_tables(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The three tables the checks run on, derived from the full manifest."""
    usable = manifest[manifest["status"] == "ok"]
    classes = class_counts(manifest)
    present = classes.loc[classes["images"] > 0, "images"]
    summary = pd.DataFrame(
        [
            {
                "imbalance_ratio": float(present.max() / present.min()) if len(present) else 0.0,
                "excluded_fraction": excluded_fraction(manifest),
            }
        ]
    )
    return {"images": usable.reset_index(drop=True), "classes": classes[["label", "images"]], "summary": summary}


def run_checks(manifest: pd.DataFrame, settings: Validate) -> tuple[list[CheckResult], list[dict]]:
    """Run every expectation with Great Expectations.

    Returns one CheckResult per expectation, and GX's own validation results (one JSON dict per
    table) for reports/validation/gx_results.json.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("manifest")
    results, raw = [], []
    for table, frame in manifest_tables(manifest).items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = context.suites.add(gx.ExpectationSuite(name=table))
        for name, expectation in _expectations(table, settings):
            expectation.meta = {"check": name}
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
        outcome = definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
        raw.append({"table": table, "result": outcome.to_json_dict()})
        for result in outcome.results:
            results.append(_check_result(table, frame, result, settings))
    return results, raw


def _check_result(table: str, frame: pd.DataFrame, result, settings: Validate) -> CheckResult:
    """One GX expectation result as a CheckResult naming the offending files (or classes)."""
    config = result.expectation_config
    name = config.meta["check"]
    indexes = [i for i in (result.result.get("unexpected_index_list") or []) if isinstance(i, int)]
    offending = frame.iloc[indexes]
    if "path" in frame:
        unexpected = offending["path"].tolist()
    elif "label" in frame:
        unexpected = [f"{row.label} ({row.images} images)" for row in offending.itertuples()]
    else:
        unexpected = [str(value) for value in result.result.get("unexpected_list") or []]
    return CheckResult(
        name=name,
        table=table,
        success=bool(result.success),
        severity="error" if name in settings.fail_on else "warning",
        expectation=config.type,
        details={k: v for k, v in config.kwargs.items() if k != "batch_id"},
        unexpected=unexpected[:50],
    )


def group_split_check(manifest: pd.DataFrame, settings) -> CheckResult:
    """near_copies_one_split: no near-copy group whose members the manifest pins to different splits
    (one line per group, naming its files); the split stage keeps every other group in one split."""
    pinned = manifest[(manifest["status"] == "ok") & (manifest["group"] != "") & (manifest["split"] != "")]
    straddling = [
        ", ".join(f"{row.path} ({row.split})" for row in members.itertuples())
        for _, members in pinned.groupby("group", sort=True)
        if members["split"].nunique() > 1
    ]
    return CheckResult(
        name="near_copies_one_split",
        table="images",
        success=not straddling,
        severity="error" if "near_copies_one_split" in settings.fail_on else "warning",
        expectation="near copies pinned to one split",
        details={"column": "group"},
        unexpected=straddling[:50],
    )


# ---------------------------------------------------------------------------------- report
def summarise(manifest: pd.DataFrame) -> dict:
    """Counts for metrics and the report: files, usable, left out, per reason, per class."""
    usable = manifest["status"] == "ok"
    excluded = manifest[~usable]
    per_class = {
        row.label: {"ok": int(row.images), "excluded": int(row.excluded)} for row in class_counts(manifest).itertuples()
    }
    reasons = excluded["reason"].map(reason_code).value_counts().sort_index()
    return {
        "files": len(manifest),
        "ok": int(usable.sum()),
        "excluded": len(excluded),
        "excluded_fraction": excluded_fraction(manifest),
        "classes": int(manifest.loc[usable, "label"].nunique()),
        "excluded_by_reason": {str(code): int(count) for code, count in reasons.items()},
        "per_class": per_class,
        "notes": int((manifest["note"] != "").sum()),
        "near_copy_groups": int(manifest.loc[usable & (manifest["group"] != ""), "group"].nunique()),
        "in_near_copy_groups": int((usable & (manifest["group"] != "")).sum()),
    }


def blocking_problems(summary: dict, checks: list[CheckResult]) -> list[str]:
    """Why the data cannot be used, one line each: failed `fail_on` checks, too few classes."""
    problems = []
    if summary["classes"] < 2:
        problems.append(f"{summary['classes']} usable classes (a classifier needs at least 2)")
    for check in checks:
        if not check.success and check.severity == "error":
            shown = ", ".join(map(str, check.unexpected[:5])) + (" ..." if len(check.unexpected) > 5 else "")
            problems.append(f"{check.name} ({_describe(check)})" + (f": {shown}" if shown else ""))
    return problems


def _describe(check: CheckResult) -> str:
    bounds = {k: v for k, v in check.details.items() if k in ("min_value", "max_value", "value_set")}
    column = check.details.get("column", "")
    return f"{column} {', '.join(f'{k}={v}' for k, v in bounds.items())}".strip()


def markdown_report(summary: dict, checks: list[CheckResult], manifest: pd.DataFrame, max_listed: int = 500) -> str:
    """The human-readable validation report: checks, counts per class and per reason, the files left out."""
    lines = [
        "# Validation report",
        "",
        f"{summary['files']} files: **{summary['ok']} usable**, {summary['excluded']} left out, "
        f"{summary['classes']} classes. {summary['excluded_fraction']:.1%} of the candidate images were "
        f"left out (hidden/OS files and symlink loops are not candidates).",
        "",
    ]
    lines += [
        "## Checks (Great Expectations)",
        "",
        "| check | expectation | result | severity | offending |",
        "|---|---|---|---|---|",
    ]
    for check in checks:
        shown = ", ".join(f"`{item}`" for item in check.unexpected[:5]) + (" ..." if len(check.unexpected) > 5 else "")
        lines.append(
            f"| {check.name} | {check.expectation} ({_describe(check)}) | "
            f"{'pass' if check.success else '**FAIL**'} | {check.severity} | {shown} |"
        )
    if not checks:
        lines.append("| (not run: no usable images) | | | | |")
    lines += ["", "## Images per class", "", "| class | usable | left out |", "|---|---:|---:|"]
    lines += [f"| {label} | {counts['ok']} | {counts['excluded']} |" for label, counts in summary["per_class"].items()]
    lines += ["", "## Files left out, per reason", "", "| reason | files | meaning |", "|---|---:|---|"]
    lines += [
        f"| {code} | {count} | {REASONS.get(code, '')} |" for code, count in summary["excluded_by_reason"].items()
    ]
    failing = [check for check in checks if not check.success]
    if failing:
        lines += ["", "## Failing checks", ""]
        for check in failing:
            lines += [f"### {check.name} ({check.severity})", ""]
            lines += [f"- `{item}`" for item in check.unexpected] + [""]
    excluded = manifest[manifest["status"] != "ok"]
    lines += ["", "## Files left out", ""]
    lines += [f"- `{row.path}`: {row.reason}" for row in excluded.head(max_listed).itertuples()] or ["None."]
    if len(excluded) > max_listed:
        lines.append(f"- ... and {len(excluded) - max_listed} more: see data/manifest.csv (status excluded)")
    noted = manifest[(manifest["status"] == "ok") & (manifest["note"] != "")]
    if len(noted):
        lines += ["", "## Usable files that were normalised", ""]
        lines += [f"- `{row.path}`: {row.note}" for row in noted.head(max_listed).itertuples()]
        if len(noted) > max_listed:
            lines.append(f"- ... and {len(noted) - max_listed} more: see data/manifest.csv (column note)")
    return "\n".join(lines) + "\n"
