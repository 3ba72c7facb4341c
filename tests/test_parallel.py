"""Decoding on every core: validate's manifest and augment's cache are the same for any number of workers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_images import write_bad_folder

from stages.lib.core.parallel import available_cores, ordered_map, worker_count
from stages.lib.core.params import Augment, Validate
from stages.lib.data.manifest import build_manifest, scan_image_folder
from stages.lib.data.prepared import create_images, decode_into


def square(value: int) -> int:
    return value * value


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_back_in_input_order_across_windows(workers):
    # 203 items through windows of 10: many windows, a short last one, chunks of unequal length
    assert list(ordered_map(square, range(203), workers, chunksize=4, window=10)) == [i * i for i in range(203)]
    assert list(ordered_map(square, [], workers)) == []


def test_pools_end_when_the_caller_has_threads_writing_and_its_own_sigterm_handler():
    # As in a long test run or a notebook: a thread writes to stderr while workers are forked (a fork can copy
    # its held lock), and SIGTERM raises KeyboardInterrupt. Pools stopped as their workers start (no items, or
    # the caller taking only the first result) used to hang in Pool.terminate() now and then.
    script = textwrap.dedent("""
        import itertools, signal, sys, threading
        from stages.lib.core.parallel import ordered_map
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        def chatter():
            while True:
                sys.stderr.write("x" * 200 + "\\n")
        threading.Thread(target=chatter, daemon=True).start()
        for _ in range(150):
            assert list(ordered_map(abs, [], 2)) == []
            assert list(itertools.islice(ordered_map(abs, range(-9, 9), 2, chunksize=1, window=2), 1)) == [9]
    """)
    done = subprocess.run([sys.executable, "-c", script], stderr=subprocess.DEVNULL, timeout=90)
    assert done.returncode == 0


def test_null_or_zero_workers_mean_the_cores_this_process_may_use():
    assert available_cores() == len(os.sched_getaffinity(0))
    assert worker_count(None) == worker_count(0) == available_cores()
    assert worker_count(3) == 3
    assert Validate().workers is None and Augment().workers is None
    with pytest.raises(ValueError):
        Augment(workers=-1)


def test_validate_manifest_is_identical_for_any_number_of_workers(tmp_path):
    images = tmp_path / "images"
    write_bad_folder(images, good_per_class=12)
    manifests = {
        workers: build_manifest(scan_image_folder(images), 8, 40_000_000, workers, chunksize=3) for workers in (1, 2, 3)
    }
    assert (manifests[1]["status"] == "excluded").sum() > 5  # the bad files are in there, with reasons
    for workers in (2, 3):
        pd.testing.assert_frame_equal(manifests[workers], manifests[1])
        assert manifests[workers].to_csv(index=False) == manifests[1].to_csv(index=False)


def write_photos(folder, count: int) -> list[str]:
    """JPEG photos of different sizes and orientations, each with distinct content."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for index in range(count):
        height, width = (90, 120) if index % 3 else (130, 70)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"{index:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def test_augment_cache_is_byte_identical_for_any_number_of_workers(tmp_path):
    paths = write_photos(tmp_path / "photos", 41)
    files = {}
    for workers in (1, 2, 3):
        folder = tmp_path / f"prepared_{workers}"
        folder.mkdir()
        images = create_images(folder, "train", len(paths), 32)
        decode_into(images, paths, "bicubic", workers, chunksize=2)
        del images  # flushed and closed
        files[workers] = (folder / "train_images.npy").read_bytes()
    assert files[2] == files[1] and files[3] == files[1]
    decoded = np.load(tmp_path / "prepared_1/train_images.npy")
    assert decoded.shape == (41, 32, 32, 3) and len({row.tobytes() for row in decoded}) == 41  # no row twice or empty
