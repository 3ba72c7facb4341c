"""Fusion through the whole pipeline: one `dvc exp run` per (fusion mode, seed), fine-tuned val and test.

    python benchmarks/fusion_finetune.py --project . [--modes none concat gated attention] [--seeds 42 1 2]
        [--out benchmarks/results/fusion_finetune.csv]

Runs in `--project` (a clone with its images tracked and the pipeline's venv active), one experiment
after the other: `dvc exp run -S features.fusion_mode=<mode> -S base.seed=<seed>` (each seed also draws
its own split). After each it reads the workspace's results: the features stage's probe val accuracy
(the logistic probe on the concatenated stages: the baseline), the fusion head's val accuracy (its row
of reports/leaderboard.csv; none for `none`), the baseline's and the fine-tuned model's test accuracy
(metrics/evaluate.json), the fine-tuned val accuracy, and the seconds of fine-tuning (the finetune
stage's log) and of the whole experiment. Prints mean ± std per mode and writes one row per run.
Choosing a default looks at val only; test is reported.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

FINETUNE_DONE = re.compile(r"finetune: kept epoch \d+: .* \((\d+) s\)")


def run_one(project: Path, mode: str, seed: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [
            "dvc",
            "exp",
            "run",
            "-n",
            f"fusion-{mode}-{seed}",
            "-S",
            f"features.fusion_mode={mode}",
            "-S",
            f"base.seed={seed}",
        ],
        cwd=project,
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"dvc exp run ({mode}, seed {seed}) failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    log = done.stdout + done.stderr
    finetune = FINETUNE_DONE.search(log)
    evaluate = json.loads((project / "metrics/evaluate.json").read_text())
    features = json.loads((project / "metrics/features.json").read_text())
    import pandas as pd

    board = pd.read_csv(project / "reports/leaderboard.csv")
    head = board[board["head"] == mode] if "head" in board else board.iloc[0:0]
    return {
        "mode": mode,
        "seed": seed,
        "probe_val": features["probe"]["val_accuracy"],
        "probe_test": evaluate["baseline"]["test"]["accuracy"],
        "head_val": float(head["val_accuracy"].iloc[0]) if len(head) else None,
        "finetuned_val": evaluate["finetuned"]["val"]["accuracy"],
        "finetuned_test": evaluate["finetuned"]["test"]["accuracy"],
        "finetune_seconds": int(finetune.group(1)) if finetune else None,
        "total_seconds": round(total, 1),
    }


def describe(values: list[float]) -> str:
    values = [value for value in values if value is not None and value == value]
    if not values:
        return ""
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--modes", nargs="+", default=["none", "concat", "gated", "attention"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fusion_finetune.csv"))
    args = parser.parse_args()
    import pandas as pd

    rows = []
    for mode in args.modes:
        for seed in args.seeds:
            rows.append(run_one(args.project, mode, seed))
            print(json.dumps(rows[-1]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(args.out, index=False)
    table = pd.DataFrame(rows)
    print("| fusion_mode | head val (features) | fine-tuned val | fine-tuned test | probe test | fine-tuning s |")
    print("|---|---|---|---|---|---|")
    for mode, group in table.groupby("mode", sort=False):
        print(
            f"| `{mode}` | {describe(list(group['head_val']))} | {describe(list(group['finetuned_val']))} | "
            f"{describe(list(group['finetuned_test']))} | {describe(list(group['probe_test']))} | "
            f"{statistics.mean(group['finetune_seconds'].dropna()):.0f} |"
        )


if __name__ == "__main__":
    main()
