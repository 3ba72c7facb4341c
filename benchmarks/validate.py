"""Throughput and peak memory of the validate stage's file inspection, against a plain loop.

    python benchmarks/validate.py [--sizes 2000 10000] [--repeats 2] [--workers N]

Builds image folders of small generated PNGs (10 classes) in a temporary directory, then, each in
a fresh process:
- pipeline: `build_manifest(scan_image_folder(folder), ...)`, the code the validate stage runs per
  file (scan, stat, sha256, header check, full decode, mode/EXIF/format checks, duplicates);
- plain: a loop that only opens, decodes and hashes the same files (`sha256(read_bytes())`,
  `Image.open(path).load()`);
- pipeline_workers / plain_pool: the same two with `--workers` processes (default: the cores this
  process may use): `build_manifest(..., workers=N)` as the stage runs it, and a plain
  `multiprocessing.Pool(N).imap` over the plain loop's per-file work.
Reports files/s of each side, the ratios pipeline / plain (one process, and N workers each), the Great
Expectations checks' time on the manifest, and
the peak memory (process max RSS, and Python's tracemalloc peak in a separate run) at each size:
flat peak memory across sizes means the files are streamed, not held. Writes
benchmarks/results/validate.json.

    python benchmarks/validate.py --signatures 10000 [--repeats 2] [--workers N]

The cost of the near-copy signatures instead: photo-like JPEGs (smooth random scenes with shapes and
noise, 320x240), validate's `build_manifest` with `validate.near_duplicates` at its defaults against the
same call with signatures off (`method: none`, validate before groups existed), alternately in fresh
processes, N workers. Prints the median of the per-repeat ratios (goal <= 1.2) and appends a row to
benchmarks/measured/validate_signatures.csv.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import append_measured, headline, write_result  # noqa: E402  (benchmarks/machine.py, beside this script)

SIDE = 64  # pixels: 12 KB decoded per image, so holding images would show in the memory figures


def build_folder(folder: Path, count: int, classes: int = 10, side: int = SIDE) -> None:
    """count distinct small RGB PNGs under folder/<class>/ (a smooth gradient plus noise, like photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = np.linspace(0, 200, side, dtype=np.float32)[None, :, None] + np.zeros((side, side, 3), np.float32)
    for index in range(count):
        label = f"class_{index % classes}"
        (folder / label).mkdir(parents=True, exist_ok=True)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / label / f"{index:06d}.png")


def build_photos(folder: Path, count: int, classes: int = 10) -> None:
    """count distinct photo-like 320x240 JPEGs under folder/<class>/: a smooth random scene (low-frequency
    noise), a few filled shapes, pixel noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for index in range(count):
        label = f"class_{index % classes}"
        (folder / label).mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
        scene = Image.fromarray(coarse).resize((320, 240), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(scene)
        for _ in range(int(rng.integers(2, 6))):
            x, y = rng.integers(0, 320), rng.integers(0, 240)
            w, h = rng.integers(20, 120, size=2)
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
        pixels = np.asarray(scene, dtype=np.float32) + rng.normal(0, 8, size=(240, 320, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / label / f"{index:06d}.jpg", quality=90)


def signatures(folder: Path, workers: int, method: str) -> int:
    """validate's inspection, with the near-copy signatures and groups (method at its default) or without."""
    from stages.lib.core.params import NearDuplicates
    from stages.lib.data.manifest import build_manifest, scan_image_folder

    settings = NearDuplicates() if method == "default" else NearDuplicates(method="none")
    manifest = build_manifest(scan_image_folder(folder), 8, 40_000_000, workers=workers, near_duplicates=settings)
    return len(manifest)


def signature_cost(count: int, repeats: int, workers: int) -> None:

    with tempfile.TemporaryDirectory(prefix="bench-signatures-") as temporary:
        folder = Path(temporary) / "photos"
        build_photos(folder, count)
        plain_loop(folder)  # warm the page cache
        runs = {"without": [], "with": []}
        for _ in range(repeats):
            for kind in runs:  # interleaved: contention hits both sides alike
                runs[kind].append(measure(f"signatures_{kind}", folder, workers=workers)["seconds"])
            print(f"without {runs['without'][-1]:.2f} s, with {runs['with'][-1]:.2f} s", flush=True)
    import statistics

    without, with_ = statistics.median(runs["without"]), statistics.median(runs["with"])
    ratio = statistics.median(w / o for w, o in zip(runs["with"], runs["without"]))  # each pair ran back to back
    row = {
        "images": count,
        "workers": workers,
        "without_s": round(without, 2),
        "with_s": round(with_, 2),
        "ratio": round(ratio, 3),
        "goal": "<= 1.2",
        "goal_met": "yes" if ratio <= 1.2 else "no",
    }
    [row] = append_measured(ROOT / "benchmarks" / "measured" / "validate_signatures.csv", [row])
    print(
        f"validate of {count} photo-like JPEGs, {workers} workers: {without:.2f} s without signatures, "
        f"{with_:.2f} s with (medians of {repeats}): median ratio {ratio:.3f} (goal <= 1.2); "
        f"load {row['load_1_5_15_min']}"
    )


def plain_one(path: Path) -> str:
    from PIL import Image

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with Image.open(path) as image:
        image.load()
    return digest


def plain_paths(folder: Path) -> list[Path]:
    return [Path(root) / name for root, _, names in os.walk(folder) for name in sorted(names)]


def plain_loop(folder: Path) -> int:
    return sum(1 for _ in map(plain_one, plain_paths(folder)))


def plain_pool(folder: Path, workers: int) -> int:
    import multiprocessing

    with multiprocessing.Pool(workers) as pool:
        return sum(1 for _ in pool.imap(plain_one, plain_paths(folder), chunksize=32))


def pipeline(folder: Path, workers: int = 1) -> int:
    from stages.lib.data.manifest import build_manifest, scan_image_folder

    manifest = build_manifest(scan_image_folder(folder), min_side=8, max_pixels=40_000_000, workers=workers)
    assert (manifest["status"] == "ok").all(), manifest[manifest["status"] != "ok"].head()
    return len(manifest)


def checks_seconds(folder: Path) -> float:
    from stages.lib.core.params import Validate
    from stages.lib.data.checks import run_checks
    from stages.lib.data.manifest import build_manifest, scan_image_folder

    manifest = build_manifest(scan_image_folder(folder), 8, 40_000_000)
    import great_expectations  # noqa: F401  (import time is not part of the checks)

    started = time.perf_counter()
    run_checks(manifest, Validate())
    return time.perf_counter() - started


def worker(kind: str, folder: Path, trace: bool, workers: int) -> dict:
    """One measurement in this (fresh) process."""
    import pandas  # noqa: F401  (imports are not part of the measurement)
    from PIL import Image  # noqa: F401

    if kind == "checks":
        return {"seconds": checks_seconds(folder)}
    if kind.startswith("signatures_"):
        started = time.perf_counter()
        files = signatures(folder, workers, "default" if kind == "signatures_with" else "none")
        return {"files": files, "seconds": time.perf_counter() - started}
    run = {
        "pipeline": pipeline,
        "plain": plain_loop,
        "pipeline_workers": lambda f: pipeline(f, workers),
        "plain_pool": lambda f: plain_pool(f, workers),
    }[kind]
    if trace:
        tracemalloc.start()
    before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    files = run(folder)
    seconds = time.perf_counter() - started
    result = {
        "files": files,
        "seconds": seconds,
        "files_per_s": files / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss) / 1024,
    }
    if trace:
        result["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    return result


def measure(kind: str, folder: Path, trace: bool = False, workers: int = 1) -> dict:
    env = os.environ | {"PYTHONWARNINGS": "ignore", "GX_ANALYTICS_ENABLED": "false", "TQDM_DISABLE": "1"}
    command = [sys.executable, __file__, "--worker", kind, "--folder", str(folder), "--workers", str(workers)]
    command += ["--trace"] if trace else []
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side; the fastest counts")
    parser.add_argument("--workers", type=int, default=None, help="default: the cores this process may use")
    parser.add_argument(
        "--worker",
        choices=[
            "pipeline",
            "plain",
            "pipeline_workers",
            "plain_pool",
            "checks",
            "signatures_with",
            "signatures_without",
        ],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--signatures", type=int, help="measure the near-copy signatures' cost on this many photos")
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.trace, args.workers)))
        return
    from stages.lib.core.parallel import available_cores

    workers = args.workers or available_cores()
    if args.signatures:
        signature_cost(args.signatures, args.repeats, workers)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as temporary:
        for size in args.sizes:
            folder = Path(temporary) / f"images_{size}"
            build_folder(folder, size)
            plain_loop(folder)  # warm the page cache once, for both sides alike
            runs = {kind: [] for kind in ("pipeline", "plain", "pipeline_workers", "plain_pool")}
            for _ in range(args.repeats):
                for kind in runs:  # interleaved, so contention hits both sides alike
                    runs[kind].append(measure(kind, folder, workers=workers))
            best = {kind: max(results, key=lambda r: r["files_per_s"]) for kind, results in runs.items()}
            traced = measure("pipeline", folder, trace=True)
            rows.append(
                {
                    "files": size,
                    "pipeline_files_per_s": round(best["pipeline"]["files_per_s"], 1),
                    "plain_files_per_s": round(best["plain"]["files_per_s"], 1),
                    "ratio": round(best["pipeline"]["files_per_s"] / best["plain"]["files_per_s"], 3),
                    "workers": workers,
                    "pipeline_workers_files_per_s": round(best["pipeline_workers"]["files_per_s"], 1),
                    "plain_pool_files_per_s": round(best["plain_pool"]["files_per_s"], 1),
                    "ratio_workers": round(
                        best["pipeline_workers"]["files_per_s"] / best["plain_pool"]["files_per_s"], 3
                    ),
                    "pipeline_peak_rss_mb": round(best["pipeline"]["peak_rss_mb"], 1),
                    "pipeline_rss_growth_mb": round(best["pipeline"]["rss_growth_mb"], 1),
                    "plain_peak_rss_mb": round(best["plain"]["peak_rss_mb"], 1),
                    "pipeline_tracemalloc_peak_mb": round(traced["tracemalloc_peak_mb"], 2),
                    "checks_seconds": round(measure("checks", folder)["seconds"], 2),
                }
            )

    header = [
        "files",
        "pipeline f/s",
        "plain f/s",
        "ratio",
        "workers",
        "pipeline f/s",
        "plain pool f/s",
        "ratio",
        "peak RSS MB",
        "RSS growth MB",
        "plain RSS MB",
        "tracemalloc MB",
        "GX checks s",
    ]
    print(" | ".join(f"{h:>13}" for h in header))
    for row in rows:
        print(" | ".join(f"{value:>13}" for value in row.values()))
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        per_file_kb = (
            (last["pipeline_tracemalloc_peak_mb"] - first["pipeline_tracemalloc_peak_mb"])
            * 1024
            / (last["files"] - first["files"])
        )
        rss_kb = (
            (last["pipeline_peak_rss_mb"] - first["pipeline_peak_rss_mb"]) * 1024 / (last["files"] - first["files"])
        )
        print(
            f"peak RSS {first['pipeline_peak_rss_mb']} MB at {first['files']} files, "
            f"{last['pipeline_peak_rss_mb']} MB at {last['files']}: {rss_kb:.2f} KB per extra file (Python heap: "
            f"{per_file_kb:.2f} KB, the manifest row), against {SIDE * SIDE * 3 / 1024:.0f} KB per decoded image"
        )
    last = rows[-1]
    headlines = [
        headline(
            f"validate, 1 process ({last['files']} PNGs)",
            "files/s",
            last["pipeline_files_per_s"],
            last["plain_files_per_s"],
            "plain open+decode+hash loop, 1 process",
            goal=">= 0.95",
            met=last["ratio"] >= 0.95,
        ),
        headline(
            f"validate, {workers} workers ({last['files']} PNGs)",
            "files/s",
            last["pipeline_workers_files_per_s"],
            last["plain_pool_files_per_s"],
            f"plain loop in a Pool({workers})",
            goal=">= 0.95",
            met=last["ratio_workers"] >= 0.95,
        ),
    ]
    write_result("validate", {"rows": rows}, headlines)


if __name__ == "__main__":
    main()
