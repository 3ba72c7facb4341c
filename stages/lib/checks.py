"""Great Expectations checks on the image manifest.

Three small tables are validated, each by its own expectations:
- `images`: the usable (status ok) rows: labels present and in the expected set, sizes in bounds,
  content hashes unique;
- `classes`: one row per class with its usable image count (minimum per class);
- `summary`: one row with the class-imbalance ratio and the fraction of files left out.
Every check has a name; `validate.fail_on` in params lists the names that fail the stage,
the others only warn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd

CHECK_NAMES = ("label_set", "image_size", "unique_content", "min_images_per_class",
               "max_imbalance_ratio", "max_excluded_fraction")


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


def _expectations(table: str, settings) -> list[tuple[str, object]]:
    """(check name, expectation) pairs for one table, from the validate params."""
    import great_expectations.expectations as gxe

    if table == "images":
        pairs = [
            ("label_set", gxe.ExpectColumnValuesToNotBeNull(column="label")),
            ("image_size", gxe.ExpectColumnValuesToBeBetween(column="width", min_value=settings.min_side)),
            ("image_size", gxe.ExpectColumnValuesToBeBetween(column="height", min_value=settings.min_side)),
            ("unique_content", gxe.ExpectColumnValuesToBeUnique(column="sha256")),
        ]
        if settings.classes:
            pairs.append(("label_set", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(settings.classes))))
        return pairs
    if table == "classes":
        return [("min_images_per_class", gxe.ExpectColumnValuesToBeBetween(
            column="images", min_value=settings.min_images_per_class))]
    return [
        ("max_imbalance_ratio", gxe.ExpectColumnValuesToBeBetween(
            column="imbalance_ratio", max_value=settings.max_imbalance_ratio)),
        ("max_excluded_fraction", gxe.ExpectColumnValuesToBeBetween(
            column="excluded_fraction", max_value=settings.max_excluded_fraction)),
    ]


def manifest_tables(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The three tables the checks run on, derived from the full manifest."""
    usable = manifest[manifest["status"] == "ok"]
    counts = usable.groupby("label").size()
    classes = counts.rename("images").rename_axis("label").reset_index()
    summary = pd.DataFrame([{
        "imbalance_ratio": float(counts.max() / counts.min()) if len(counts) else 0.0,
        "excluded_fraction": float((manifest["status"] != "ok").mean()) if len(manifest) else 0.0,
    }])
    return {"images": usable.reset_index(drop=True), "classes": classes, "summary": summary}


def run_checks(manifest: pd.DataFrame, settings) -> list[CheckResult]:
    """Run every expectation with Great Expectations; return one result per expectation."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("manifest")
    results = []
    for table, frame in manifest_tables(manifest).items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = context.suites.add(gx.ExpectationSuite(name=table))
        for name, expectation in _expectations(table, settings):
            expectation.meta = {"check": name}
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
        outcome = definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
        for result in outcome.results:
            config = result.expectation_config
            name = config.meta["check"]
            indexes = result.result.get("unexpected_index_list") or []
            offending = frame.iloc[[i for i in indexes if isinstance(i, int)]]
            column = "path" if "path" in frame else ("label" if "label" in frame else None)
            unexpected = offending[column].tolist() if column else list(result.result.get("unexpected_list") or [])
            results.append(CheckResult(
                name=name, table=table, success=bool(result.success),
                severity="error" if name in settings.fail_on else "warning",
                expectation=config.type,
                details={k: v for k, v in config.kwargs.items() if k != "batch_id"},
                unexpected=unexpected[:50],
            ))
    return results
