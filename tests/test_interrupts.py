"""Ctrl-C (SIGINT) or SIGTERM on a command that starts servers leaves nothing running: `make server`
(team.server start) interrupted while it waits for the new server stops the MLflow server and the
PostgreSQL it had started. (team.sweep's private server and trials: tests/local_scenario.py; the test
runner passes SIGINT on to a scenario and waits for its cleanup: tests/namespace.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cluster_scenario import free_port
from local_scenario import descendants
from scenario import processes

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.server]


def started_by(marker: str) -> set[int]:
    """The live processes whose command line names `marker` (a state folder)."""
    return {pid for pid, _, cmdline in processes() if marker in cmdline}


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_make_server_stops_what_it_started(sent):
    from team import TeamError
    from team.postgres import find_bindir

    try:
        find_bindir()
    except TeamError as error:
        pytest.skip(str(error))
    root = Path(tempfile.mkdtemp(prefix="ti-", dir="/tmp"))  # PostgreSQL's unprivileged user must reach it
    root.chmod(0o755)
    home = root / "team"
    command = [sys.executable, "-m", "team.server", "start", "--home", str(home)]
    command += ["--port", str(free_port()), "--pg-port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    running: set[int] = set()
    # until both servers run: PostgreSQL (its data folder) and `mlflow server` (its artifacts folder)
    while not (started_by(str(home / "postgres")) and started_by(str(home / "artifacts"))):
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
        running |= descendants(process.pid)
        time.sleep(0.2)
    time.sleep(1)  # mlflow server's own children (uvicorn) start
    running |= descendants(process.pid) | started_by(str(home))
    os.kill(process.pid, sent)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output.decode()
    time.sleep(1)
    left = started_by(str(home)) | (running & {pid for pid, _, _ in processes()})
    shutil.rmtree(root, ignore_errors=True)
    assert not left, f"left running after {sent.name}: {[(p, c[:100]) for p, _, c in processes() if p in left]}"
