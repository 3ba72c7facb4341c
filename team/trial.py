"""One sweep trial, run by a Ray worker on whichever node has the resources: a DVC experiment from a
fresh clone, pushed back to the project's git and DVC remotes.

Steps, in a scratch folder of the node (removed afterwards):
1. `git clone` the project's git remote, check out the sweep's commit; skip everything if the
   experiment's ref is already on the remote (a trial that pushed and then lost its worker).
2. `dvc pull --run-cache`: upstream outputs come from the DVC remote instead of being recomputed.
3. `dvc exp run -n <exp> -S key=value ...` with the team tracking server (MLFLOW_TRACKING_URI),
   PIPELINE_THREADS = the trial's CPUs and MLFLOW_RUN_CONTEXT tags naming the sweep.
4. `dvc exp push --force origin <exp>`: the git ref and the outputs (DVC remote). `--force` keeps a
   name unique: a retry of a trial replaces what an earlier attempt may have pushed.

On one machine (`spec["cache_dir"]` set, team.local) the remote is the workspace itself: the clone
borrows its objects (`git clone --shared`), uses its DVC cache (`cache.dir`, linked rather than copied
where the filesystem allows), restores the committed outputs with `dvc checkout` instead of step 2, and
step 4 pushes the git ref only (`--no-cache`: the outputs are already in the shared cache).

A failure of the pipeline or of a remote is returned as status "failed" with one line (it is not
retried: it would fail again). A command killed by a signal (the OOM killer, a preemption: `dvc exp run`
itself, or a stage DVC reports as "exited with -9") raises `TrialKilled`, which the runner retries up
to `--retries` times (Ray: `retry_exceptions`), as it retries a lost worker. The commands run in their
own process group, and a watchdog process kills that group and removes the scratch folder as soon as
the worker is gone, so an abandoned attempt leaves nothing running.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from team.results import TrialResult, exp_ref, exps_prefix

log = logging.getLogger("team.trial")

# the watchdog: waits for the worker (argv[1]) to go, then kills the command's process group (argv[2])
# and removes the scratch folder (argv[3]); exits when the command's group is gone
WATCHDOG = """
import os, shutil, signal, sys, time
worker, group, scratch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def alive(pid):  # a zombie (killed, not yet reaped) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
            return not os.path.isdir("/proc/self")
        except ProcessLookupError:
            return False
def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
while group_alive(group):
    if not alive(worker):
        os.killpg(group, signal.SIGKILL)
        time.sleep(1)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        break
    time.sleep(0.5)
"""


KILLED_STAGE = re.compile(r"exited with -\d+")  # DVC's words for a stage command ended by a signal
_active: set[int] = set()  # process groups of the commands running now (one per trial in flight)
_active_lock = threading.Lock()
_stopping = threading.Event()  # set by stop_active: no new command starts in this process


class TrialFailed(Exception):
    """A step of the trial failed: its message is the one line the report shows."""


class TrialKilled(TrialFailed):
    """A step was killed by a signal (not a failure of its own): the trial may be retried."""


def watch(watched: int, group: int, scratch: Path | None = None) -> subprocess.Popen:
    """A watchdog process: once `watched` is gone, it SIGKILLs process group `group` and removes `scratch`."""
    return subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, str(watched), str(group), str(scratch or "")],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )


def stop_active() -> int:
    """SIGKILL the process group of every trial command running in this process (a driver that is
    interrupted); returns how many there were."""
    with _active_lock:
        _stopping.set()
        groups = list(_active)
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(groups)


def exp_ref_exists(remote: str, commit: str, name: str, env: dict | None = None) -> bool:
    """Whether the git remote holds the experiment `name` of baseline `commit`
    (DVC's layout: refs/exps/<commit[:2]>/<commit[2:]>/<name>)."""
    result = subprocess.run(
        ["git", "ls-remote", remote, exp_ref(commit, name)], capture_output=True, text=True, env=env, timeout=120
    )
    if result.returncode != 0:
        raise TrialFailed(f"git ls-remote {remote} failed: {_last_line(result.stderr)}")
    return bool(result.stdout.strip())


def remote_experiments(remote: str, commit: str, env: dict | None = None) -> set[str]:
    """The names of every experiment of baseline `commit` on the git remote."""
    prefix = exps_prefix(commit)
    result = subprocess.run(
        ["git", "ls-remote", remote, f"{prefix}*"], capture_output=True, text=True, env=env, timeout=120
    )
    if result.returncode != 0:
        raise TrialFailed(f"git ls-remote {remote} failed: {_last_line(result.stderr)}")
    return {line.split("\t", 1)[1][len(prefix) :] for line in result.stdout.splitlines() if "\t" in line}


def _last_line(text: str) -> str:
    """The most telling line of a command's output: a stage's own `error: ...` line (the pipeline reports
    its failures so), else DVC's or git's last ERROR/fatal line, else the last non-empty one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    stage = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if stage:  # the stage's message with its detail lines (up to DVC's own ERROR line), joined
        block = [lines[stage[-1]]]
        for line in lines[stage[-1] + 1 :]:
            if line.startswith(("ERROR", "fatal", "Traceback")) or len(block) >= 6:
                break
            block.append(line)
        return " ".join(block)[:500]
    tools = [line for line in lines if line.startswith(("ERROR", "fatal", "Error"))]
    return (tools or lines or ["(no output)"])[-1][:300]


def _run(
    command: list[str], cwd: Path, env: dict, scratch: Path, what: str, timeout_s: float, timings: dict | None = None
) -> str:
    """Run `command` in its own process group, guarded by the watchdog; raise TrialFailed on failure.
    Adds its seconds to `timings[what]`."""
    if _stopping.is_set():
        raise TrialKilled(f"{what} not started: the driver is stopping")
    log.info("%s: %s", what, " ".join(command))
    started = time.monotonic()
    logfile = scratch / "commands.log"
    offset = logfile.stat().st_size if logfile.exists() else 0
    with open(logfile, "ab") as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    with _active_lock:
        _active.add(process.pid)
        if _stopping.is_set():  # stop_active ran while this command started
            os.killpg(process.pid, signal.SIGKILL)
    watchdog = watch(os.getpid(), process.pid, scratch)
    try:
        returncode = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        raise TrialFailed(f"{what} took longer than {timeout_s:.0f} s") from None
    finally:
        with _active_lock:
            _active.discard(process.pid)
        watchdog.kill()
        watchdog.wait()
        if timings is not None:
            timings[what] = round(timings.get(what, 0.0) + time.monotonic() - started, 2)
    with open(logfile, "rb") as log_in:
        log_in.seek(offset)
        output = log_in.read().decode(errors="replace")
    if returncode < 0 or (returncode != 0 and KILLED_STAGE.search(output)):
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the killed command's stages, if they outlived it
        except ProcessLookupError:
            pass
        killed = f"signal {-returncode}" if returncode < 0 else KILLED_STAGE.search(output).group(0)
        raise TrialKilled(f"{what} was killed ({killed})")
    if returncode != 0:
        raise TrialFailed(f"{what} failed ({returncode}): {_last_line(output)}")
    return output


def share_cache(repo: Path, cache: str) -> None:
    """Make the clone at `repo` use the DVC cache `cache`, linking outputs where the filesystem allows
    (what `dvc config --local cache.dir/cache.type` writes, without two DVC starts)."""
    (repo / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {cache}\n    type = reflink,hardlink,copy\n")


def run_trial(spec: dict) -> TrialResult:
    """Run one trial (see the module's docstring). `spec`: remote, commit, name, params ({key: value}),
    env (variables for the stages: MLFLOW_*, PIPELINE_THREADS ...), objective ("file:key"), scratch_root,
    timeout_s, cache_dir (one machine: the workspace's DVC cache). Returns its TrialResult (status
    ok | exists | failed); raises TrialKilled when a command was killed by a signal."""
    from team.overrides import Objective

    started = time.monotonic()
    result = TrialResult.start(spec["name"], spec["params"], node=_node())
    timings = result.timings
    root = Path(spec.get("scratch_root") or tempfile.gettempdir()) / "team-sweep"
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{spec['name']}-{uuid.uuid4().hex[:6]}-", dir=root))
    repo = scratch / "repo"
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env |= {
        "PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        "GX_ANALYTICS_ENABLED": "false",
        "GIT_TERMINAL_PROMPT": "0",
    } | spec.get("env", {})
    dvc = str(bindir / "dvc") if (bindir / "dvc").exists() else "dvc"
    timeout_s = float(spec.get("timeout_s", 7200))
    try:
        checked = time.monotonic()
        exists = exp_ref_exists(spec["remote"], spec["commit"], spec["name"], env)
        timings["git ls-remote"] = round(time.monotonic() - checked, 2)
        if exists:
            result.status = "exists"
            return result
        shared = ["--shared"] if spec.get("cache_dir") else []  # this machine's workspace: borrow its objects
        steps = [
            (["git", "clone", "-q", *shared, "--no-checkout", spec["remote"], str(repo)], scratch, "git clone"),
            (["git", "checkout", "-q", spec["commit"]], repo, "git checkout"),
            (["git", "config", "user.email", "team.sweep@localhost"], repo, "git config"),
            (["git", "config", "user.name", "team.sweep"], repo, "git config"),
        ]
        for command, cwd, what in steps:
            _run(command, cwd, env, scratch, what, 600, timings)
        if spec.get("cache_dir"):  # one machine: the workspace's cache, linked where the filesystem allows
            share_cache(repo, spec["cache_dir"])
        restore = [dvc, "checkout"] if spec.get("cache_dir") else [dvc, "pull", "--run-cache"]
        try:
            _run(restore, repo, env, scratch, "dvc pull", 1800, timings)
        except TrialKilled:
            raise
        except TrialFailed as error:  # outputs missing on the remote are recomputed by dvc exp run
            log.warning("%s: %s (dvc exp run recomputes what is missing)", spec["name"], error)
        run = [dvc, "exp", "run", "-n", spec["name"]]
        for key, value in spec["params"].items():
            run += ["-S", f"{key}={value}"]
        _run(run, repo, env, scratch, "dvc exp run", timeout_s, timings)
        result.objective = Objective.parse(spec["objective"]).read(repo) if spec.get("objective") else None
        no_cache = ["--no-cache"] if spec.get("cache_dir") else []  # the outputs are in the shared cache already
        push = [dvc, "exp", "push", "--force", *no_cache, "origin", spec["name"]]
        _run(push, repo, env, scratch, "dvc exp push", 1800, timings)
        result.status = "ok"
    except TrialKilled:
        raise  # the runner's to retry
    except TrialFailed as error:
        result.error = str(error)
    finally:
        result.duration_s = round(time.monotonic() - started, 1)
        if not spec.get("keep_scratch"):
            shutil.rmtree(scratch, ignore_errors=True)
    return result


def _node() -> str:
    """This node's name in the report: Ray's node IP and a short node id inside a Ray task, else the host name."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # never start Ray here: only a Ray worker has it running
        context = ray.get_runtime_context()
        return f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:8]}"
    return socket.gethostname()
