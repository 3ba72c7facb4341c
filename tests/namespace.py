"""Run a scenario script inside a loopback-only network namespace (`unshare -n`), as the team tests do,
so that nothing it starts listens on the machine's network. Ctrl-C (SIGINT) or SIGTERM on the test is
passed on to the scenario, which stops what it started in its `finally`; it is killed only if it has
not ended after `grace_s`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def namespace_unavailable() -> str | None:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(["unshare", "-n", "--", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a private network namespace (unshare -n: {probe.stderr.strip()[:120]}); run as root"
    return None


def run_scenario(script: str, *args: str, timeout_s: float = 1800, grace_s: float = 120) -> tuple[int, str]:
    """Run `python <script> <args>` in a new network namespace; returns (exit status, output)."""
    command = f"ip link set lo up && exec {sys.executable} {script} {' '.join(args)}"
    process = subprocess.Popen(
        ["unshare", "-n", "--", "bash", "-c", command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))},
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except BaseException:  # Ctrl-C, SIGTERM (as KeyboardInterrupt) or the timeout: let it clean up first
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        raise
    return process.returncode, output
