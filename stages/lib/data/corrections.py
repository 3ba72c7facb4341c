"""The user's corrections (data/corrections.csv), applied by validate without touching the images.

Columns: `path` (as in data/manifest.csv, or relative to `data.images_dir`), `action` (`exclude` or
`relabel`), `label` (the right class, for relabel), `note` (why; recorded in the manifest). The audit's
reports/audit/suggested_corrections.csv has the same columns, so agreeing with a suggestion is a copy of
its row. A row that names no listed file, a class the data set does not have, or another action stops
validate with one error naming the line and the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stages.lib.core.errors import PipelineError
from stages.lib.data.images import ManifestRow

COLUMNS = ["path", "action", "label", "note"]
ACTIONS = ("exclude", "relabel")


class CorrectionError(PipelineError, ValueError):
    """A row of the corrections file cannot be applied."""


@dataclass(frozen=True)
class Correction:
    line: int  # in the file, counting the header as line 1
    path: str
    action: str
    label: str
    note: str


def read_corrections(path: str | Path) -> list[Correction]:
    """The rows of the corrections file (none when it does not exist)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        return []
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise CorrectionError(f"{path}: not a readable CSV ({error}); expected columns {','.join(COLUMNS)}") from None
    missing = [column for column in ("path", "action") if column not in table]
    if missing:
        raise CorrectionError(f"{path}: no column {', '.join(missing)} (expected {','.join(COLUMNS)})")
    return [
        Correction(
            line=line,
            path=str(record["path"]).strip().replace("\\", "/"),
            action=str(record["action"]).strip().lower(),
            label=str(record.get("label", "")).strip(),
            note=str(record.get("note", "")).strip(),
        )
        for line, record in enumerate(table.to_dict("records"), start=2)
    ]


def apply_corrections(
    rows: list[ManifestRow], corrections: list[Correction], images_dir: str | Path, source: str = "data/corrections.csv"
) -> None:
    """Exclude or relabel the rows the corrections name; the manifest's reason or note records each one."""
    by_path = {row.path: row for row in rows}
    classes = {row.label for row in rows if row.label}
    for fix in corrections:
        where = f"{source} line {fix.line}"
        row = by_path.get(fix.path) or by_path.get(Path(images_dir, fix.path).as_posix())
        if row is None:
            row = by_path.get(os.path.normpath(fix.path).replace(os.sep, "/"))
        if fix.action not in ACTIONS:
            raise CorrectionError(f"{where}: unknown action '{fix.action}' (use exclude or relabel)")
        if row is None:
            raise CorrectionError(f"{where}: unknown path '{fix.path}' (no such file in data/manifest.csv)")
        said = f" ({fix.note})" if fix.note else ""
        if fix.action == "exclude":
            if row.status == "ok":
                row.exclude(f"corrected: excluded by {where}{said}")
            continue
        if fix.label not in classes:
            raise CorrectionError(
                f"{where}: unknown class '{fix.label}' for relabel (classes: {', '.join(sorted(classes))})"
            )
        if fix.label != row.label:
            row.add_note(f"relabelled {row.label} -> {fix.label} by {where}{said}")
            row.label = fix.label
