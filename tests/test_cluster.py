"""Sweeps on a real 2-node Ray cluster (team.cluster, team.sweep, team.trial), end to end.

Everything runs inside one loopback-only network namespace (`unshare -n`): Ray listens on every
interface of a machine, so it must not run on the host's network here. The whole story lives in
tests/cluster_scenario.py (one shared setup: the team tracking server on PostgreSQL, a bare git
`origin`, a folder DVC remote, the tiny project after `dvc repro`, a Ray head and a worker node, each
1 CPU); this test runs it and checks that every scenario passed and nothing was left running.
Skipped where a network namespace cannot be made (not root / no user namespaces) or without PostgreSQL.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from namespace import namespace_unavailable, run_scenario

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ["refusals", "grid", "resume", "optuna", "seeds", "node", "failures"]


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
    returncode, output = run_scenario("tests/cluster_scenario.py", *SCENARIOS, timeout_s=1800)
    print(output[-20000:])
    for name in SCENARIOS:
        assert f"SCENARIO {name} OK" in output, f"scenario {name} did not pass:\n{output[-8000:]}"
    assert "LEFTOVER" not in output and "ALL OK" in output and returncode == 0, output[-4000:]
    print(f"cluster scenarios: {time.monotonic() - started:.0f} s")
