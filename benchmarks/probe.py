"""The features stage's linear probe (a C grid of logistic regressions) against a plain scikit-learn loop.

    python benchmarks/probe.py [--candidate tf_efficientnet_lite0] [--threads N] [--repeats 3]

Both sides fit the same embeddings over the default C grid of params.yaml: the demo's own (the features
stage's `data/features/<--candidate>.npz`, 1,257 training and 270 val rows of 1,752 fused columns, 10 classes,
after `make demo`), else synthetic ones of the same shape (which converge in fewer iterations):
- pipeline: `stages.lib.training.probe.fit_probe` (standardise, one LogisticRegression per C, pick by val), which
  keeps OpenBLAS to one thread;
- plain: what a scikit-learn user writes: StandardScaler, then LogisticRegression per C with the BLAS
  threads the process has (`--threads`, default: the cores it may use), scored on val;
- plain_1_thread: the same loop on one BLAS thread.
They alternate `--repeats` times; the best time of each counts. Prints the seconds per grid, the ratios
plain / pipeline (> 1: the pipeline is faster), and whether all chose the same C with the same val
accuracy. The pipeline's scaler floors tiny feature scales (see `standardiser`), so its fits may need
more iterations than the plain loop's; the one-thread side shows that part apart from the threads.
Writes benchmarks/results/probe.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import headline, write_result  # noqa: E402  (benchmarks/machine.py, beside this script)

from stages.lib.core.parallel import available_cores  # noqa: E402
from stages.lib.training.probe import fit_probe  # noqa: E402


def embeddings(rows: int, dim: int, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative pooled-feature-like rows: a class centre plus noise, through a ReLU."""
    centres = rng.normal(size=(classes, dim))
    labels = np.arange(rows) % classes
    return np.maximum(centres[labels] + rng.normal(scale=2.0, size=(rows, dim)), 0).astype(np.float32), labels


def plain_grid(train_x, train_y, val_x, val_y, c_grid: list[float], max_iter: int, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    train_s, val_s = scaler.transform(train_x), scaler.transform(val_x)
    scores = {
        c: LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(train_s, train_y).score(val_s, val_y)
        for c in c_grid
    }
    best = max(scores, key=scores.get)
    return {"C": best, "val_accuracy": scores[best]}


def one_thread(function, *args):
    with threadpool_limits(limits=1, user_api="blas"):
        return function(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", default="tf_efficientnet_lite0", help="whose demo embeddings to fit")
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = yaml.safe_load((ROOT / "params.yaml").read_text())["features"]
    c_grid, max_iter, seed = settings["C"], settings["max_iter"], 42

    demo = ROOT / "data" / "features" / f"{args.candidate}.npz"
    if demo.is_file():
        with np.load(demo) as arrays:
            train_x, train_y, val_x, val_y = (arrays[key] for key in ("train_x", "train_y", "val_x", "val_y"))
        source = f"the demo's {args.candidate} embeddings"
    else:
        rng = np.random.default_rng(0)
        train_x, train_y = embeddings(1257, 1752, 10, rng)
        val_x, val_y = embeddings(270, 1752, 10, rng)
        source = "synthetic embeddings"
    variants = {
        "pipeline": lambda: fit_probe(train_x, train_y, val_x, val_y, c_grid, max_iter, seed),
        "plain": lambda: plain_grid(train_x, train_y, val_x, val_y, c_grid, max_iter, seed),
        "plain_1_thread": lambda: one_thread(plain_grid, train_x, train_y, val_x, val_y, c_grid, max_iter, seed),
    }
    seconds, results = {name: [] for name in variants}, {}
    with threadpool_limits(limits=args.threads, user_api="blas"):  # the process's budget; fit_probe lowers it
        for _ in range(args.repeats):
            for name, function in variants.items():
                started = time.perf_counter()
                results[name] = function()
                seconds[name].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in seconds.items()}
    plains = {"plain": args.threads, "plain_1_thread": 1}  # the plain sides and their BLAS threads
    ratios = {name: best[name] / best["pipeline"] for name in plains}
    same = all(
        results[name]["C"] == results["pipeline"]["C"]
        and abs(results[name]["val_accuracy"] - results["pipeline"]["val_accuracy"]) < 1e-9
        for name in plains
    )

    shape = f"{len(train_x)}+{len(val_x)} x {train_x.shape[1]}"
    print(
        f"\nlinear probe on {source} ({shape}), C grid {c_grid}, {args.threads} BLAS threads for the plain "
        f"loop, best of {args.repeats}"
    )
    for name, values in seconds.items():
        print(f"{name:<16}{min(values):>8.2f} s   median {float(np.median(values)):.2f} s")
    print(
        f"plain / pipeline: {ratios['plain']:.2f}x; plain on one thread / pipeline: "
        f"{ratios['plain_1_thread']:.2f}x; same C and val accuracy: {same}"
    )

    write_result(
        "probe",
        {
            "embeddings": source,
            "shape": shape,
            "c_grid": c_grid,
            "blas_threads_plain": args.threads,
            "repeats": args.repeats,
            "seconds": seconds,
            "ratio": ratios["plain"],
            "ratio_1_thread": ratios["plain_1_thread"],
            "same_choice": same,
        },
        [
            headline(
                f"linear probe, {len(c_grid)} C values ({source}, {shape})",
                "s",
                best["pipeline"],
                best[name],
                f"plain scikit-learn loop, {threads} BLAS thread(s)",
                higher_is_better=False,
                goal=">= 1.0 (not slower than plain)",
                met=best["pipeline"] <= best[name],
            )
            for name, threads in plains.items()
        ],
    )


if __name__ == "__main__":
    main()
