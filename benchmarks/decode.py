"""Decoding photos into the prepared cache on every core, against plain PIL loops, in one run.

    python benchmarks/decode.py [--images 4000] [--size 160] [--workers N] [--repeats 2] [--photos DIR]

Writes `--images` generated JPEG photos (500x375, a smooth scene plus noise, each distinct) to a
temporary folder, then decodes them to `--size` px squares (shorter side resized bicubic,
centre crop, uint8) with:
- pipeline: `stages.lib.data.prepared.decode_into`, what the augment stage runs, with `--workers`
  processes (default: the cores this process may use) writing into the on-disk cache array;
- pipeline_1_worker: the same with one worker (in this process);
- plain_pool: a plain `multiprocessing.Pool(workers).imap` over a function that opens, drafts,
  converts, resizes and crops with PIL, collected into a NumPy array (same workers, same chunks).
The three alternate `--repeats` times after one warm-up pass (page cache); the best time of each
counts. Then one traced pass shows the parent's peak Python memory while decoding (flat: a bounded
window of images, not the data set). Checks that all give the same pixels. Writes
benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
import tracemalloc
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import headline, write_result  # noqa: E402  (benchmarks/machine.py, beside this script)

from stages.lib.core.parallel import available_cores  # noqa: E402
from stages.lib.data.prepared import create_images, decode_into  # noqa: E402

CHUNKSIZE = 16


def write_photo(index: int, folder: Path, width: int = 500, height: int = 375) -> str:
    """One distinct JPEG 'photo': a colour gradient with a random tint plus sensor-like noise."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    scene = np.stack([x / width * 200, y / height * 200, (x + y) / (width + height) * 255], axis=-1)
    tint = rng.uniform(-40, 40, 3).astype(np.float32)
    pixels = np.clip(scene + tint + rng.normal(0, 12, scene.shape).astype(np.float32), 0, 255).astype(np.uint8)
    path = folder / f"{index:05d}.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    return str(path)


def write_photos(folder: Path, count: int) -> list[str]:
    """count photos in folder (on every core); the ones already there are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [index for index in range(count) if not (folder / f"{index:05d}.jpg").is_file()]
    with multiprocessing.Pool(available_cores()) as pool:
        pool.map(partial(write_photo, folder=folder), missing, chunksize=32)
    return [str(folder / f"{index:05d}.jpg") for index in range(count)]


def plain_decode(path: str, size: int) -> np.ndarray:
    """What a plain PIL loop does per file: open, draft, RGB, resize the shorter side, centre crop."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        image = image.convert("RGB")
    scale = size / min(image.size)
    image = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.Resampling.BICUBIC
    )
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def plain_pool(paths: list[str], size: int, workers: int) -> np.ndarray:
    out = np.empty((len(paths), size, size, 3), np.uint8)
    with multiprocessing.Pool(workers) as pool:
        for index, pixels in enumerate(pool.imap(partial(plain_decode, size=size), paths, chunksize=CHUNKSIZE)):
            out[index] = pixels
    return out


def pipeline(paths: list[str], size: int, workers: int, folder: Path) -> np.ndarray:
    images = create_images(folder, "train", len(paths), size)
    decode_into(images, paths, "bicubic", workers, chunksize=CHUNKSIZE)
    return images


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the pool's workers, once joined)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--workers", type=int, default=None, help="default: the cores this process may use")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--photos",
        type=Path,
        help="keep the generated photos here and reuse them next time (default: a temporary folder)",
    )
    args = parser.parse_args()
    workers = args.workers or available_cores()

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as temporary:
        temporary = Path(temporary)
        started = time.perf_counter()
        paths = write_photos(args.photos or temporary / "photos", args.images)
        print(f"{len(paths)} JPEGs of 500x375 ready in {time.perf_counter() - started:.1f} s")
        sides = {
            "pipeline": lambda: pipeline(paths, args.size, workers, temporary),
            "pipeline_1_worker": lambda: pipeline(paths, args.size, 1, temporary),
            "plain_pool": lambda: plain_pool(paths, args.size, workers),
        }
        reference = plain_pool(paths, args.size, workers)  # warm-up: the page cache holds the files for all
        seconds = {name: [] for name in sides}
        cpu = {name: [] for name in sides}
        same = True
        for _ in range(args.repeats):
            for name, side in sides.items():
                started, cpu_started = time.perf_counter(), cpu_seconds()
                result = side()
                seconds[name].append(time.perf_counter() - started)
                cpu[name].append(cpu_seconds() - cpu_started)
                same = same and np.array_equal(np.asarray(result), reference)
                del result
        tracemalloc.start()
        pipeline(paths, args.size, workers, temporary)
        traced_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()

    rate = {name: args.images / min(values) for name, values in seconds.items()}
    print(f"\ndecode {args.images} JPEGs 500x375 -> {args.size}px, {workers} workers, best of {args.repeats}")
    cpu_ms = {name: 1000 * min(values) / args.images for name, values in cpu.items()}
    for name, value in rate.items():
        print(f"{name:<20}{value:>9.1f} img/s   {min(seconds[name]):.2f} s   {cpu_ms[name]:.2f} CPU ms/img")
    # on a loaded machine the wall-clock speed-up says little; CPU per image shows what parallelism costs:
    # on free cores the speed-up is about workers x (CPU per image with 1 worker / with N workers)
    free_cores_speedup = workers * cpu_ms["pipeline_1_worker"] / cpu_ms["pipeline"]
    print(
        f"CPU per image, {workers} workers vs 1: {cpu_ms['pipeline'] / cpu_ms['pipeline_1_worker']:.3f}x "
        f"(speed-up to expect on {workers} free cores: {free_cores_speedup:.2f}x)"
    )
    speedup = rate["pipeline"] / rate["pipeline_1_worker"]
    versus_plain = rate["pipeline"] / rate["plain_pool"]
    rows = [
        headline(
            f"augment decode, {workers} workers vs 1 ({args.images} JPEGs -> {args.size} px)",
            "img/s",
            rate["pipeline"],
            rate["pipeline_1_worker"],
            "the pipeline with 1 worker",
            goal=">= 1.7 on 2 cores" if workers == 2 else None,
            met=speedup >= 1.7 if workers == 2 else None,
        ),
        headline(
            f"augment decode, {workers} workers vs a plain Pool({workers}) PIL loop",
            "img/s",
            rate["pipeline"],
            rate["plain_pool"],
            f"plain multiprocessing PIL loop, {workers} workers",
            goal=">= 0.95",
            met=versus_plain >= 0.95,
        ),
    ]
    for row in rows:
        print(f"{row['name']}: ratio {row['ratio']:.3f} (goal {row['goal']})")
    decoded_mb = args.images * args.size * args.size * 3 / 2**20
    print(
        f"parent's peak Python memory while decoding: {traced_peak_mb:.1f} MB (the decoded set: {decoded_mb:.0f} MB); "
        f"same pixels on every side: {same}"
    )
    write_result(
        "decode",
        {
            "images": args.images,
            "source": "JPEG 500x375",
            "size": args.size,
            "workers": workers,
            "chunksize": CHUNKSIZE,
            "repeats": args.repeats,
            "seconds": seconds,
            "img_per_s": {name: round(value, 1) for name, value in rate.items()},
            "cpu_ms_per_image": {name: round(value, 3) for name, value in cpu_ms.items()},
            "cpu_seconds": cpu,
            "free_cores_speedup_estimate": round(free_cores_speedup, 3),
            "parent_tracemalloc_peak_mb": round(traced_peak_mb, 2),
            "decoded_set_mb": round(decoded_mb, 1),
            "same_pixels": same,
        },
        rows,
    )


if __name__ == "__main__":
    main()
