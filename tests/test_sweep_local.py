"""A sweep on one machine with nothing set up (no remotes, no tracking server, no Ray), end to end:
tests/local_scenario.py inside a loopback-only network namespace, on a copy of the session's tiny
pipeline. A 4-trial grid of evaluate's params (each trial re-runs that stage only) from the workspace's
own repository, DVC cache and SQLite store (served by the sweep's private MLflow server); one trial's
`dvc exp run` SIGKILLed mid-stage and retried; the driver interrupted (SIGINT) with every process it
started gone; the same command resumes and completes: 4 experiments in `dvc exp show`, 4 FINISHED parent
runs and none RUNNING. Skipped where a network namespace cannot be made (not root / no user namespaces)."""

from __future__ import annotations

import time

import pytest
from namespace import namespace_unavailable, run_scenario

pytestmark = [pytest.mark.slow]


def test_a_sweep_on_one_machine_needs_no_setup_retries_a_killed_trial_and_resumes(tiny_pipeline):
    reason = namespace_unavailable()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    returncode, output = run_scenario("tests/local_scenario.py", str(tiny_pipeline), timeout_s=600)
    print(output[-20000:])
    for name in ("refusals", "grid", "resume"):
        assert f"SCENARIO {name} OK" in output, f"scenario {name} did not pass:\n{output[-8000:]}"
    assert "LEFTOVER" not in output and "ALL OK" in output and returncode == 0, output[-4000:]
    print(f"local sweep scenarios: {time.monotonic() - started:.0f} s")
