"""What every benchmark result records about the machine it ran on, and the headline rows of the summary."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

from stages.lib.core.parallel import available_cores  # each benchmark puts the repository on sys.path first

RESULTS = Path(__file__).resolve().parent / "results"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Cores, library versions, thread settings and the load at the time of the measurement."""
    torch_threads = None
    if "torch" in sys.modules:  # only when the benchmark itself uses torch
        torch_threads = sys.modules["torch"].get_num_threads()
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_count": os.cpu_count(),
        "available_cores": available_cores(),
        "load_average_1_5_15": [round(value, 2) for value in os.getloadavg()],
        "torch": _version("torch"),
        "torch_threads": torch_threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "python": platform.python_version(),
        "pillow": _version("pillow"),
        "machine": f"{platform.system()} {platform.machine()} {platform.processor()}".strip(),
    }


def headline(
    name: str,
    unit: str,
    pipeline: float,
    baseline: float,
    baseline_name: str,
    higher_is_better: bool = True,
    goal: str | None = None,
    met: bool | None = None,
) -> dict:
    """One row of benchmarks/results/summary.md: the pipeline's figure, the plain baseline's (run in the
    same process), their ratio (> 1: the pipeline is better, whichever way the unit points), the goal
    in words and whether it is met."""
    ratio = pipeline / baseline if higher_is_better else baseline / pipeline
    return {
        "name": name,
        "unit": unit,
        "pipeline": round(pipeline, 3),
        "baseline": round(baseline, 3),
        "baseline_name": baseline_name,
        "ratio": round(ratio, 3),
        "goal": goal,
        "met": met,
    }


def write_result(stem: str, result: dict, rows: list[dict]) -> Path:
    """benchmarks/results/<stem>.json with the environment and the headline rows added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}.json"
    path.write_text(
        json.dumps({"benchmark": stem, "environment": environment(), "headline": rows} | result, indent=2, default=str)
        + "\n"
    )
    print(f"wrote {path.relative_to(RESULTS.parents[1])}")
    return path


def append_measured(path: Path, rows: list[dict]) -> list[dict]:
    """Append `rows` to a committed benchmarks/measured CSV (its header first, when the file is new), each
    stamped with the load average (1, 5, 15 min) and today's date; returns the stamped rows."""
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    rows = [row | {"load_1_5_15_min": load, "date": datetime.date.today().isoformat()} for row in rows]
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return rows
