"""Markdown tables from committed rows: the measured CSVs in `benchmarks/measured/` and the stages of `dvc.yaml`.

Every table of measured numbers in the docs is generated from these rows when the site is built (the mkdocs
hook `docs/hooks/tables.py` calls `render`), never typed. The same table, by hand:

    python -m scripts.tables benchmarks/measured/fusion_probe.csv
    python -m scripts.tables benchmarks/measured/fusion_finetune_digits.csv \\
        --group-by mode --mean-std head_val,finetuned_val,finetuned_test --mean finetune_seconds --percent
    python -m scripts.tables --stage finetune

A CSV has one header line, one measurement per row, units in the column names (`_pct`, `_s`, `_ms`), and
optionally a `source` column (where and when it was measured); `source` is shown under the table, not in it.
Only the standard library and PyYAML are used, so the docs build without the project's heavy dependencies.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTE_COLUMNS = ("source", "measured_at")


class TableError(ValueError):
    """A table that cannot be rendered: unknown file, column or stage (the docs build fails on it)."""


def read_rows(path: str | Path, root: Path = ROOT) -> tuple[list[str], list[dict[str, str]]]:
    file = Path(path) if Path(path).is_absolute() else root / path
    if not file.is_file():
        raise TableError(f"{path}: no such file")
    with open(file, newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        rows = [row for row in reader if any((value or "").strip() for value in row.values())]
    if not header:
        raise TableError(f"{path}: no header line")
    return header, rows


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def _escape(cell: str) -> str:
    return str(cell).replace("|", "\\|").replace("\n", " ")


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; numeric columns right-aligned."""
    numeric = [
        all(_number(row[i]) is not None or row[i] == "" for row in rows) and any(row[i] for row in rows)
        for i in range(len(header))
    ]
    lines = [
        "| " + " | ".join(_escape(name) for name in header) + " |",
        "|" + "|".join("---:" if is_number else "---" for is_number in numeric) + "|",
    ]
    lines += ["| " + " | ".join(_escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render(  # noqa: PLR0913 (each option is a keyword of the docs' table marker, by name only)
    path: str | Path,
    *,
    columns: list[str] | None = None,
    where: dict[str, str] | None = None,
    percent: bool | list[str] = False,
    group_by: str | list[str] | None = None,
    mean_std: list[str] | None = None,
    mean: list[str] | None = None,
    digits: int = 2,
    summary: list[str] | None = None,
    caption: bool = True,
    root: Path = ROOT,
) -> str:
    """The rows of `path` as a Markdown table.

    columns: the columns shown, in order (default: all but `source`/`measured_at`). where: keep the rows whose
    column equals the value. percent: multiply fractions by 100 (True: every column named in mean_std/mean, or a
    list of columns), shown with `digits` decimals. group_by + mean_std/mean: one row per group (in order of first
    appearance) with `n`, mean ± sample standard deviation and means. summary: rows appended below the table,
    each a statistic of every numeric column ("mean", "std" (sample), "min", "max"), as `make seeds` prints.
    """
    header, rows = read_rows(path, root)
    for key, value in (where or {}).items():
        if key not in header:
            raise TableError(f"{path}: no column {key!r} (columns: {', '.join(header)})")
        rows = [row for row in rows if row[key] == str(value)]
    if not rows:
        raise TableError(f"{path}: no rows{' where ' + str(where) if where else ''}")
    groups = [group_by] if isinstance(group_by, str) else list(group_by or [])
    aggregated = list(mean_std or []) + list(mean or [])
    scaled = set((mean_std or []) if percent is True else (percent or []))
    for name in [*(columns or []), *groups, *aggregated, *scaled]:
        if name not in header:
            raise TableError(f"{path}: no column {name!r} (columns: {', '.join(header)})")

    def value(row: dict[str, str], name: str) -> float | None:
        number = _number(row[name])
        return None if number is None else number * (100 if name in scaled else 1)

    def label(name: str) -> str:
        return f"{name}_pct" if name in scaled and not name.endswith("_pct") else name

    if groups:
        order: dict[tuple, list[dict[str, str]]] = {}
        for row in rows:
            order.setdefault(tuple(row[g] for g in groups), []).append(row)
        out_header = [*groups, "n", *[label(n) for n in mean_std or []], *[label(n) for n in mean or []]]
        out_rows = []
        for key, members in order.items():
            cells = [*key, str(len(members))]
            for name in mean_std or []:
                values = [v for v in (value(r, name) for r in members) if v is not None]
                cells.append(
                    ""
                    if not values
                    else _fmt(statistics.mean(values), digits)
                    + (f" ± {_fmt(statistics.stdev(values), digits)}" if len(values) > 1 else "")
                )
            for name in mean or []:
                values = [v for v in (value(r, name) for r in members) if v is not None]
                whole = all(v == int(v) for v in values)  # seconds, counts: a whole mean is enough
                cells.append(_fmt(statistics.mean(values), 0 if whole else digits) if values else "")
            out_rows.append(cells)
    else:
        shown = columns or [name for name in header if name not in NOTE_COLUMNS]
        out_header = [label(name) for name in shown]
        out_rows = [
            [
                _fmt(value(row, name), digits) if name in scaled and value(row, name) is not None else (row[name] or "")
                for name in shown
            ]
            for row in rows
        ]
        functions = {"mean": statistics.mean, "std": statistics.stdev, "min": min, "max": max}
        for statistic in summary or []:
            if statistic not in functions:
                raise TableError(f"summary: unknown statistic {statistic!r} (one of {', '.join(functions)})")
            cells = []
            for i, name in enumerate(shown):
                values = [value(row, name) for row in rows]
                numeric = i > 0 and values and all(v is not None for v in values)
                decimals = max(len(row[name].partition(".")[2]) for row in rows) if numeric else 0
                cells.append(_fmt(functions[statistic](values), decimals) if numeric else (statistic if i == 0 else ""))
            out_rows.append(cells)
    table = markdown(out_header, out_rows)
    if caption:
        sources = list(dict.fromkeys(row[n] for row in rows for n in NOTE_COLUMNS if n in header and row.get(n)))
        note = f"Rows: `{Path(path).as_posix()}`" + (f"; {'; '.join(sources)}" if sources else "") + "."
        table += f"\n\n<small>{_escape(note)}</small>"
    return table


def stage(name: str, root: Path = ROOT) -> str:
    """What `dvc.yaml` declares for one stage (command, deps, params, outs, metrics) as a Markdown table."""
    import yaml

    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    stages = pipeline.get("stages", {})
    if name not in stages:
        raise TableError(f"dvc.yaml: no stage {name!r} (stages: {', '.join(stages)})")
    spec = stages[name]

    def items(key: str) -> list[str]:
        found = []
        for entry in spec.get(key) or []:
            found += [f"`{k}`" for k in entry] if isinstance(entry, dict) else [f"`{entry}`"]
        return found

    code = [d for d in items("deps") if d.startswith(("`stages/", "`scripts/"))]
    data = [d for d in items("deps") if d not in code]
    rows = [
        ["command", f"`{' '.join(str(spec['cmd']).split())}`"],
        ["code deps", ", ".join(code) or "none"],
        ["data deps", ", ".join(data) or "none"],
        ["params", ", ".join(items("params")) or "none"],
        ["outs", ", ".join(items("outs")) or "none"],
        ["metrics", ", ".join(items("metrics")) or "none"],
    ]
    if spec.get("plots"):
        rows.append(["plots", ", ".join(items("plots"))])
    outs = [out.strip("`").rstrip("/") for out in items("outs")]
    charts = []  # the top-level plots drawn from this stage's outs
    for plot in pipeline.get("plots") or []:
        for title, chart in plot.items() if isinstance(plot, dict) else []:
            files = list((chart or {}).get("y", {}) if isinstance((chart or {}).get("y"), dict) else [])
            if any(f == out or f.startswith(out + "/") for f in files for out in outs):
                charts.append(title.split(" (")[0])
    if charts:
        rows.append(["charts (`dvc plots show`)", ", ".join(charts)])
    return markdown(["dvc.yaml", name], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print the Markdown table the docs render for a CSV of measured rows, or for a stage of dvc.yaml."
    )
    parser.add_argument("csv", nargs="?", help="e.g. benchmarks/measured/fusion_probe.csv")
    parser.add_argument("--stage", help="a stage of dvc.yaml instead of a CSV")
    parser.add_argument("--columns", help="comma-separated columns to show")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE")
    parser.add_argument("--group-by", help="comma-separated columns: one row per group")
    parser.add_argument("--mean-std", help="comma-separated columns: mean ± sample std per group")
    parser.add_argument("--mean", help="comma-separated columns: mean per group")
    parser.add_argument("--percent", action="store_true", help="fractions as percentages (the --mean-std columns)")
    parser.add_argument("--summary", help="comma-separated rows to append: mean,std,min,max")
    parser.add_argument("--digits", type=int, default=2)
    args = parser.parse_args(argv)
    split = lambda text: [part for part in (text or "").split(",") if part]  # noqa: E731
    if args.stage:
        print(stage(args.stage))
        return
    if not args.csv:
        parser.error("give a CSV path or --stage NAME")
    where = dict(item.split("=", 1) for item in args.where)
    print(
        render(
            args.csv,
            columns=split(args.columns) or None,
            where=where or None,
            percent=args.percent,
            group_by=split(args.group_by) or None,
            mean_std=split(args.mean_std) or None,
            mean=split(args.mean) or None,
            digits=args.digits,
            summary=split(args.summary) or None,
        )
    )


if __name__ == "__main__":
    main()
