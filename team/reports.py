"""A sweep's reports: reports/sweeps/<name>.csv (one row per trial), .md (the table and the best trial)
and .json (every result as returned, with each trial's seconds per step)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from team.overrides import Objective
from team.results import TrialResult, best


def write_reports(
    name: str, search: str, objective: Objective | None, results: list[TrialResult], folder: Path
) -> tuple[Path, Path]:
    """Write `<name>.csv`, `.md` and `.json` into `folder`; returns the paths of the first two."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(key for result in results for key in result.params))
    column = str(objective) if objective else "objective"
    header = ["trial", *keys, column, "status", "node", "duration_s", "error"]
    rows = [
        [
            r.name,
            *(r.params.get(k, "") for k in keys),
            "" if r.objective is None else r.objective,
            r.status,
            r.node,
            r.duration_s,
            r.error,
        ]
        for r in results
    ]
    csv_path = folder / f"{name}.csv"
    with open(csv_path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    top = best(results, objective)
    lines = [
        f"# Sweep `{name}`",
        "",
        f"{len(results)} trials ({search}); {sum(r.finished for r in results)} finished, "
        f"{sum(r.status == 'failed' for r in results)} failed. Objective: "
        f"{f'`{column}` ({objective.mode})' if objective else 'none'}.",
        "",
    ]
    if top:
        lines += [
            f"**Best trial: `{top.name}`** {column} = {top.objective:.4f} with "
            + ", ".join(f"`{k}={v}`" for k, v in top.params.items()),
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| "
        + " | ".join(
            f"{cell:.4f}" if isinstance(cell, float) and i == len(keys) + 1 else str(cell) for i, cell in enumerate(row)
        ).replace("\n", " ")
        + " |"
        for row in rows
    ]
    lines += [
        "",
        "`exists`: the experiment was already made (by an earlier run of this sweep). "
        "See them all: `dvc exp show`; outputs of one: `dvc exp apply NAME && dvc pull`.",
    ]
    md_path = folder / f"{name}.md"
    md_path.write_text("\n".join(lines) + "\n")
    (folder / f"{name}.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return csv_path, md_path
