"""The audit stage's share of a pipeline execution, from the MLflow runs the stages logged.

    make demo && python benchmarks/audit_share.py [--store sqlite:///mlflow.db]

Reads the stage runs of the latest pipeline execution (one parent run; see docs/tracking.md), prints each
stage's wall time and the audit's share of their sum (goal: at most 10 % of `make demo`'s pipeline), and
appends a row to benchmarks/measured/audit_share.csv. Stages reused from DVC's cache logged no run in that
execution and are not counted: run it after a complete `dvc repro` (`make demo` on a fresh copy, or
`dvc repro -f`).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "benchmarks" / "measured" / "audit_share.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=f"sqlite:///{ROOT / 'mlflow.db'}", help="the MLflow tracking URI")
    args = parser.parse_args()
    import mlflow

    mlflow.set_tracking_uri(args.store)
    runs = mlflow.search_runs(search_all_experiments=True)
    stages = runs[runs["tags.stage"].notna() & runs["tags.mlflow.parentRunId"].notna()]
    latest = stages.sort_values("start_time")["tags.mlflow.parentRunId"].iloc[-1]
    execution = stages[stages["tags.mlflow.parentRunId"] == latest]
    seconds = {
        row["tags.stage"]: (row["end_time"] - row["start_time"]).total_seconds() for _, row in execution.iterrows()
    }
    total = sum(seconds.values())
    for stage, value in seconds.items():
        print(f"{stage:10} {value:7.1f} s  {value / total:6.1%}")
    share = seconds.get("audit", 0.0) / total
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"audit: {seconds.get('audit', 0.0):.1f} s of {total:.1f} s = {share:.1%} (goal <= 10 %); load {load}")
    row = {
        "stages": len(seconds),
        "pipeline_s": round(total, 1),
        "audit_s": round(seconds.get("audit", 0.0), 1),
        "share": round(share, 3),
        "goal": "<= 0.10",
        "goal_met": "yes" if share <= 0.10 else "no",
        "load_1_5_15_min": load,
        "date": datetime.date.today().isoformat(),
    }
    new = not MEASURED.exists()
    with MEASURED.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
