"""seeds: how robust is the recipe? Mean ± std and min of the headline metrics over seed experiments.

    for seed in 42 1 2; do dvc exp run --queue -S base.seed=$seed; done
    dvc queue start -j 1 && dvc queue status      # wait until all are done
    python -m stages.seeds                        # or: make seeds

Takes the DVC experiments of the current commit (`dvc.api.exp_show`) whose params equal the
workspace's except `base.seed` (the committed recipe, other seeds: each seed also draws its own
split), one per seed (the newest), and prints per seed and over all: the fine-tuned and baseline test
accuracy and macro-F1, the fine-tuned ECE and val accuracy. Not a DVC stage.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

SEED = "base.seed"
HEADLINE = {  # column in `dvc exp show` -> label
    "metrics/evaluate.json:finetuned.test.accuracy": "fine-tuned test acc",
    "metrics/evaluate.json:finetuned.test.macro_f1": "fine-tuned macro F1",
    "metrics/evaluate.json:finetuned.test.ece": "fine-tuned ECE",
    "metrics/evaluate.json:finetuned.val.accuracy": "fine-tuned val acc",
    "metrics/evaluate.json:baseline.test.accuracy": "probe test acc",
}


def _column(row: dict, name: str):
    """A value of an exp_show row by its name with or without `file:` (DVC names a column by its key alone
    when that is unambiguous)."""
    if name in row:
        return row[name]
    short = name.split(":", 1)[-1]
    return next((value for key, value in row.items() if key.split(":", 1)[-1] == short), None)


def param_keys(raw: dict, prefix: str = "") -> list[str]:
    """The dotted keys of params.yaml as `dvc exp show` names its columns (nested mappings flattened)."""
    keys = []
    for key, value in raw.items():
        keys += param_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def seed_rows(rows: list[dict], keys: list[str]) -> list[dict]:
    """The finished experiments whose params (`keys`) equal the workspace's except `base.seed`: one per seed,
    the newest (exp_show lists newest first)."""
    workspace = next((row for row in rows if row.get("rev") == "workspace"), None)
    if workspace is None:
        return []
    recipe = lambda row: {key: _column(row, key) for key in keys if key != SEED}  # noqa: E731
    wanted, chosen = recipe(workspace), {}
    for row in rows:
        if row.get("typ") == "baseline" or row.get("State") not in (None, "Success"):
            continue
        seed = _column(row, SEED)
        if seed is not None and recipe(row) == wanted and _column(row, next(iter(HEADLINE))) is not None:
            chosen.setdefault(seed, row)
    return [chosen[seed] for seed in sorted(chosen)]


def report(rows: list[dict]) -> str:
    labels = list(HEADLINE.values())
    lines = [f"{'seed':>6}  " + "  ".join(f"{label:>20}" for label in labels)]
    values = {label: [] for label in labels}
    for row in rows:
        cells = []
        for name, label in HEADLINE.items():
            value = _column(row, name)
            if isinstance(value, (int, float)):
                values[label].append(float(value))
            cells.append(f"{value:>20.4f}" if isinstance(value, (int, float)) else f"{'—':>20}")
        lines.append(f"{int(_column(row, SEED)):>6}  " + "  ".join(cells))

    def stat(label, fn):
        data = values[label]
        return f"{fn(data):>20.4f}" if data else f"{'—':>20}"

    std = lambda data: statistics.stdev(data) if len(data) > 1 else math.nan  # noqa: E731
    lines.append(f"{'mean':>6}  " + "  ".join(stat(label, statistics.fmean) for label in labels))
    lines.append(f"{'std':>6}  " + "  ".join(stat(label, std) for label in labels))
    lines.append(f"{'min':>6}  " + "  ".join(stat(label, min) for label in labels))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    import dvc.api
    import yaml

    rows = seed_rows(dvc.api.exp_show(), param_keys(yaml.safe_load(open("params.yaml"))))
    if not rows:
        print(
            "no finished experiments of the committed recipe with other seeds: queue them first\n"
            "  for seed in 42 1 2; do dvc exp run --queue -S base.seed=$seed; done; dvc queue start",
            file=sys.stderr,
        )
        return 1
    print(f"{len(rows)} seed experiments of the committed recipe (test split reported; each seed its own split):")
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
