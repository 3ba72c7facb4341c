"""GPU leases by lock file (stages/lib/core/gpus.py), with a faked device count: real processes, real flocks.

Holders are subprocesses that lease, print their device and sleep; the test reads what each got."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stages.lib.core import gpus as gpu_lease

HOLDER = """
import os, sys, time
from stages.lib.core.gpus import lease
device = lease(folder=sys.argv[1], wait_s=float(sys.argv[2]), poll_s=0.1)
print(device, os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
time.sleep(float(sys.argv[3]))
"""
ROOT = Path(__file__).resolve().parents[1]


def holder(folder: Path, devices: int, wait_s: float = 0.0, hold_s: float = 60.0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {gpu_lease.ENV_COUNT: str(devices)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(wait_s), str(hold_s)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def first_line(process: subprocess.Popen) -> list[str]:
    return process.stdout.readline().split()


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_two_holders_get_different_devices_and_a_third_waits_for_a_killed_ones(tmp_path):
    a, b = holder(tmp_path, 2), holder(tmp_path, 2)
    c = None
    try:
        got_a, got_b = first_line(a), first_line(b)
        assert {got_a[0], got_b[0]} == {"0", "1"} and got_a[0] == got_a[1] and got_b[0] == got_b[1]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-0.lock", "gpu-1.lock"]
        c = holder(tmp_path, 2, wait_s=30)  # both devices leased: it waits
        time.sleep(1.5)
        assert c.poll() is None
        a.send_signal(signal.SIGKILL)  # a crash: the kernel drops a's flock
        a.wait()
        assert first_line(c)[0] == got_a[0]
    finally:
        stop(*(p for p in (a, b, c) if p))


def test_no_free_device_within_the_wait_gives_no_lease(tmp_path):
    a = holder(tmp_path, 2)
    b = holder(tmp_path, 2)
    try:
        first_line(a), first_line(b)
        late = holder(tmp_path, 2, wait_s=0.5, hold_s=0)
        assert first_line(late) == ["None", "None"]
        late.wait()
    finally:
        stop(a, b)


def test_nothing_to_choose_leaves_the_environment_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_lease.lease(count=1, folder=tmp_path) is None  # one GPU (or none): nothing to choose
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # chosen by a scheduler (Ray, Slurm) or the user
    assert gpu_lease.lease(count=4, folder=tmp_path) is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not list(tmp_path.iterdir())


def test_the_lock_folder_is_the_repositorys_dvc_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert gpu_lease.lock_dir() == tmp_path / ".dvc" / "tmp"
    monkeypatch.setenv(gpu_lease.ENV_COUNT, "3")
    assert gpu_lease.device_count() == 3


def test_a_gpu_stage_leases_at_its_start_and_a_cpu_stage_does_not(tmp_path):
    """setup_stage(gpu=True), as features and finetune call it, leases a device on a multi-GPU machine."""
    script = (
        "import os, sys; from stages.lib.core.stage import setup_stage; setup_stage(gpu=sys.argv[1] == 'gpu'); "
        "print(os.environ.get('CUDA_VISIBLE_DEVICES'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "LOCAL_WORLD_SIZE")}
    env |= {gpu_lease.ENV_COUNT: "2", "DVC_ROOT": str(tmp_path)}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", script, kind], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        for kind in ("gpu", "cpu")
    ]
    assert outputs[0][-1] in ("0", "1") and outputs[1][-1] == "None"
    assert (tmp_path / ".dvc" / "tmp" / f"gpu-{outputs[0][-1]}.lock").is_file()
