"""One GPU per pipeline process under plain `dvc queue start -j N`: a lease by lock file, crash-safe.

The stages that use CUDA (features, finetune) lease through `setup_stage(gpu=True)`; the CPU thread budget
(threads.py) splits the cores among the same queue workers, so each experiment gets cores / N and one GPU.

DVC's queue runs N experiments at once on one machine and tells none of them which GPU to use, so all
would pile onto device 0. `lease()`, called at a stage's start before torch touches CUDA, picks a
free device and sets `CUDA_VISIBLE_DEVICES` to it:

- only when the machine has more than one GPU and `CUDA_VISIBLE_DEVICES` is unset (a scheduler such as
  Ray or Slurm that set it has already chosen; a user who set it has too);
- a device is free when nobody holds `fcntl.flock` on `<DVC_ROOT>/.dvc/tmp/gpu-<i>.lock`; the lease is
  held by this process until it exits (also by a crash or SIGKILL: the kernel drops the lock), so no
  stale lease survives its holder;
- when every device is leased it waits (`GPU_LEASE_WAIT_S`, default: as long as it takes) and logs once.

Devices are counted without initialising CUDA (that would fix the visible devices before the lease):
`/proc/driver/nvidia/gpus/*`, else `nvidia-smi -L`. `GPU_LEASE_DEVICES=<n>` overrides the count (tests,
or to lease among the first n only).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV_COUNT = "GPU_LEASE_DEVICES"
ENV_WAIT = "GPU_LEASE_WAIT_S"
_held: dict[int, int] = {}  # device -> open lock file descriptor, kept for the life of the process


def device_count() -> int:
    """GPUs of this machine, counted without initialising CUDA (0 when none is found)."""
    if os.environ.get(ENV_COUNT):
        return int(os.environ[ENV_COUNT])
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    if shutil.which("nvidia-smi"):
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return 0
        return sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    return 0


def lock_dir() -> Path:
    """<DVC_ROOT>/.dvc/tmp: shared by every experiment of the repository, also `--queue`/`--temp` copies."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd())
    return root / ".dvc" / "tmp"


def _try(device: int, folder: Path) -> bool:
    fd = os.open(folder / f"gpu-{device}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[device] = fd
    return True


def lease(
    count: int | None = None, folder: Path | None = None, wait_s: float | None = None, poll_s: float = 1.0
) -> int | None:
    """Lease a free GPU and make it this process's only visible device; return its index, or None when
    there is nothing to choose (one GPU or none, CUDA_VISIBLE_DEVICES already set, or no device became free
    within `wait_s`). Call before torch initialises CUDA. Idempotent within a process."""
    if _held:
        return next(iter(_held))
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return None
    count = device_count() if count is None else count
    if count <= 1:
        return None
    folder = Path(folder) if folder else lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if wait_s is None and os.environ.get(ENV_WAIT):
        wait_s = float(os.environ[ENV_WAIT])
    deadline = None if wait_s is None else time.monotonic() + wait_s
    start = os.getpid() % count  # spread first tries, fewer collisions
    waiting_logged = False
    while True:
        for offset in range(count):
            device = (start + offset) % count
            if _try(device, folder):
                os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
                log.info("GPU lease: device %d of %d (%s)", device, count, folder / f"gpu-{device}.lock")
                return device
        if deadline is not None and time.monotonic() >= deadline:
            log.warning("GPU lease: all %d devices leased for %.0f s; running without a lease", count, wait_s)
            return None
        if not waiting_logged:
            log.info("GPU lease: all %d devices are leased by other experiments; waiting for one", count)
            waiting_logged = True
        time.sleep(poll_s)
