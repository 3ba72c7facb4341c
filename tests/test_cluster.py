"""Sweeps on a real 2-node Ray cluster (team.cluster, team.sweep, team.trial), end to end.

Everything runs inside one loopback-only network namespace (`unshare -n`): Ray listens on every
interface of a machine, so it must not run on the host's network here. The whole story lives in
tests/cluster_scenario.py (one shared setup: the team tracking server on PostgreSQL, a bare git
`origin`, a folder DVC remote, the tiny project after `dvc repro`, a Ray head and a worker node, each
1 CPU); this test runs it and checks that every scenario passed and nothing was left running.
Skipped where a network namespace cannot be made (not root / no user namespaces) or without PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ["refusals", "grid", "resume", "optuna", "seeds", "node", "failures"]


def namespace_unavailable() -> str | None:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(["unshare", "-n", "--", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a private network namespace (unshare -n: {probe.stderr.strip()[:120]}); run as root"
    return None


def postgres_unavailable() -> str | None:
    from team import TeamError
    from team.postgres import find_bindir

    try:
        find_bindir()
    except TeamError as error:
        return str(error)
    return None


def test_sweeps_on_a_two_node_ray_cluster_complete_survive_faults_and_resume():
    pytest.importorskip("ray", reason="the cluster extra is not installed (pip install -e '.[cluster]')")
    pytest.importorskip("optuna", reason="the cluster extra is not installed (pip install -e '.[cluster]')")
    for reason in (namespace_unavailable(), postgres_unavailable()):
        if reason:
            pytest.skip(reason)
    started = time.monotonic()
    command = f"ip link set lo up && exec {sys.executable} tests/cluster_scenario.py {' '.join(SCENARIOS)}"
    result = subprocess.run(
        ["unshare", "-n", "--", "bash", "-c", command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env={k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))},
    )
    output = result.stdout + result.stderr
    print(output[-20000:])
    for name in SCENARIOS:
        assert f"SCENARIO {name} OK" in output, f"scenario {name} did not pass:\n{output[-8000:]}"
    assert "LEFTOVER" not in output and "ALL OK" in output and result.returncode == 0, output[-4000:]
    print(f"cluster scenarios: {time.monotonic() - started:.0f} s")
