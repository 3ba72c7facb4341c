"""benchmarks/results/summary.md: one Markdown table from the headline rows of every result file.

    python benchmarks/summary.py

Reads benchmarks/results/*.json (written by the benchmarks, `make bench`), one row per headline:
the pipeline's figure, the plain baseline's measured in the same run, their ratio (> 1: the
pipeline is better), the goal, and the machine's load when it was measured.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def table(results: list[dict]) -> str:
    lines = [
        "| benchmark | pipeline | plain baseline (same run) | ratio | goal | load 1/5/15 min |",
        "|---|---:|---|---:|---|---|",
    ]
    for result in results:
        load = " / ".join(f"{value:.1f}" for value in result["environment"]["load_average_1_5_15"])
        for row in result["headline"]:
            goal = row["goal"] or ""
            if row["met"] is not None:
                goal = f"{goal}: {'met' if row['met'] else '**not met**'}"
            lines.append(
                f"| {row['name']} | {row['pipeline']:.4g} {row['unit']} | {row['baseline']:.4g} "
                f"{row['unit']} ({row['baseline_name']}) | {row['ratio']:.2f} | {goal} | {load} |"
            )
    return "\n".join(lines) + "\n"


def environment_note(results: list[dict]) -> str:
    first = results[0]["environment"]
    threads = sorted(
        {
            str(result["environment"].get("torch_threads"))
            for result in results
            if result["environment"].get("torch_threads")
        }
    )
    return (
        f"{first['cpu_count']} cores ({first['available_cores']} available), {first['machine']}, Python "
        f"{first['python']}, torch {first['torch']} (torch threads: {', '.join(threads) or 'n/a'}; "
        f"OMP_NUM_THREADS={first['OMP_NUM_THREADS']}), measured {min(r['environment']['time'] for r in results)}"
        f" to {max(r['environment']['time'] for r in results)}.\n"
    )


def main() -> None:
    results = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    results = [result for result in results if result.get("headline")]
    if not results:
        raise SystemExit(f"no benchmark results in {RESULTS}: run `make bench` first")
    text = table(results) + "\n" + environment_note(results)
    (RESULTS / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
