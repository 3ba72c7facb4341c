"""What the scenario scripts share (tests/local_scenario.py, tests/cluster_scenario.py): the log line, the
process table, and `play`, which runs the scenarios in order and then checks that nothing they started is
left running (a leftover fails the run, as a failed scenario does)."""

from __future__ import annotations

import os
import shutil
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def processes() -> list[tuple[int, int, str]]:
    """(pid, ppid, command line) of every live process."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found.append((int(proc.name), int(fields[1]), cmdline))
    return found


def play(
    scenarios: dict[str, Callable],
    root: Path,
    start: Callable[[], object],
    stop: Callable[[], None],
    leftover: Callable[[str], bool],
    needed_by_the_rest: Callable[[str], bool] = lambda name: True,
) -> int:
    """`start()` the subject, run each scenario on it (a failure stops the run when `needed_by_the_rest` says
    the later ones need it), then `stop()` and report every process whose command line `leftover` matches.
    SIGTERM ends the run as Ctrl-C does, and a second interrupt cannot cut the cleanup short. Prints
    `SCENARIO <name> OK|FAILED <seconds>`, `LEFTOVER processes: ...` and `ALL OK` or `FAILED: [...]`;
    returns the exit status. `root` is removed at the end unless KEEP is set."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    failed = []
    try:
        started = time.monotonic()
        subject = start()
        log(f"set up ({time.monotonic() - started:.0f} s)")
        for name, scenario in scenarios.items():
            started = time.monotonic()
            log(f"SCENARIO {name} ...")
            try:
                scenario(subject)
                print(f"SCENARIO {name} OK {time.monotonic() - started:.0f}", flush=True)
            except Exception:  # noqa: BLE001 - report every scenario
                traceback.print_exc()
                print(f"SCENARIO {name} FAILED {time.monotonic() - started:.0f}", flush=True)
                failed.append(name)
                if needed_by_the_rest(name):
                    break
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop()
        leftovers = [(pid, cmd[:80]) for pid, _, cmd in processes() if leftover(cmd)]
        if leftovers:
            print(f"LEFTOVER processes: {leftovers}", flush=True)
            failed.append("leftovers")
        if not os.environ.get("KEEP"):
            shutil.rmtree(root, ignore_errors=True)
    print("ALL OK" if not failed else f"FAILED: {failed}", flush=True)
    return 1 if failed else 0
