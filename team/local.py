"""A sweep on one machine with nothing to set up: no git or DVC remote, no tracking server, no Ray.

- Trials clone the workspace's own repository at the sweep's commit and share its DVC cache
  (team.trial with `cache_dir`): unchanged stages are restored from it, not recomputed, and nothing is
  copied between caches. Each trial pushes its experiment's git ref back into the workspace, so
  `dvc exp show` lists it and `dvc exp apply` finds its outputs in the same cache.
- MLflow: the workspace's own SQLite store, which takes one writer at a time, is served to the trials by
  a private `mlflow server` on 127.0.0.1 (`PrivateServer`) for the sweep's lifetime; it is stopped by its
  process group at the end, on SIGINT/SIGTERM, and by a watchdog process if the driver is killed outright.
- `LocalRunner` runs up to `limit` trials at once in threads (each trial is a few commands), with
  `--cpus` threads each (PIPELINE_THREADS) and `--gpus` devices from this machine's
  (CUDA_VISIBLE_DEVICES per trial, as Ray gives them). A trial killed by a signal is retried up to
  `--retries` times; one that fails by itself is not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from team import TeamError
from team.results import TrialResult
from team.server import _group_alive, _log_tail, health
from team.trial import TrialKilled, run_trial, stop_active, watch

log = logging.getLogger("team.sweep")


def machine_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES entries: the driver's own CUDA_VISIBLE_DEVICES when set,
    else the devices found without initialising CUDA (GPU_LEASE_DEVICES=n overrides the count, as for the
    stages' lease: stages/lib/core/gpus.py)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    if os.environ.get("GPU_LEASE_DEVICES"):
        return [str(i) for i in range(int(os.environ["GPU_LEASE_DEVICES"]))]
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return [str(i) for i in range(sum(1 for _ in proc.iterdir()))]
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            return [str(i) for i, line in enumerate(x for x in listing.splitlines() if x.startswith("GPU "))]
    return []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivateServer:
    """`mlflow server` on 127.0.0.1 for one SQLite store, in its own process group. Args:
    store: the SQLite file (created with MLflow's schema when missing).
    artifacts: where artifacts of experiments without a location go (the pipeline sets each experiment's).
    home: where its log and PID file live.
    timeout_s: how long it may take to answer /health.
    """

    def __init__(self, store: Path, artifacts: Path, home: Path, timeout_s: float = 180.0):
        self.store, self.artifacts, self.home, self.timeout_s = store, artifacts, home, timeout_s
        self.pid: int | None = None
        self.url = ""
        self._watchdog: subprocess.Popen | None = None

    @property
    def pidfile(self) -> Path:
        return self.home / "mlflow.pid"

    def start(self) -> str:
        """Start it (stopping one a killed driver left behind first) and wait for /health; returns its URL."""
        self.home.mkdir(parents=True, exist_ok=True)
        self._stop_recorded()
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.store}",
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        logfile = self.home / "mlflow.log"
        with open(logfile, "ab") as out:
            process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.pid = process.pid
        self.pidfile.write_text(f"{process.pid}\n")
        self._watchdog = watch(os.getpid(), process.pid)  # a driver killed outright takes the server with it
        deadline = time.monotonic() + self.timeout_s
        while not health(self.url):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise TeamError(
                    f"the sweep's MLflow server for {self.store} did not answer "
                    f"({'exited' if process.poll() is not None else 'timeout'}); {logfile}:\n{_log_tail(logfile)}"
                )
            time.sleep(0.3)
        log.info("MLflow: the workspace's store %s, served at %s (pid %d)", self.store, self.url, process.pid)
        return self.url

    def _stop_recorded(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text())
            if b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes():
                _stop_group(pid)

    def stop(self) -> None:
        """SIGTERM its process group, SIGKILL what is left after a few seconds; remove the PID file."""
        if self.pid:
            _stop_group(self.pid)
            self.pid = None
        if self._watchdog:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        self.pidfile.unlink(missing_ok=True)

    def __enter__(self) -> PrivateServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_group(pgid: int, timeout_s: float = 15.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, 0)


def ensure_experiment(url: str, name: str, root: Path) -> None:
    """Create the pipeline's experiment in the store when missing, with its artifacts under the workspace
    (`mlartifacts/<name>`, as a stage would create it on the local store)."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    if client.get_experiment_by_name(name) is None:
        experiment_id = client.create_experiment(name, artifact_location=(root / "mlartifacts" / name).as_uri())
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")


class LocalRunner:
    """Runs trials in threads on this machine, at most `limit` at once and no more GPUs than it has."""

    def __init__(self, sweep, cores: int, gpus: list[str]):
        self.sweep = sweep
        self.limit = sweep.max_concurrent or max(1, int(cores // max(sweep.cpus, 1e-9)))
        self.free = dict.fromkeys(gpus, 1.0)  # the share of each GPU not leased to a trial
        self.pending: dict[Future, tuple[dict, object, list[str]]] = {}
        self.pool = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="trial")
        self.stopping = False

    def _lease(self) -> list[str] | None:
        """Devices for one trial (`--gpus`): whole free devices, or one with room for a fraction; None if none."""
        need = self.sweep.gpus
        if need <= 0:
            return []
        if need >= 1:
            whole = [d for d, share in self.free.items() if share >= 1.0][: int(need)]
            return whole if len(whole) == int(need) else None
        fits = [d for d, share in self.free.items() if share >= need - 1e-9]
        return fits[:1] or None

    def _release(self, devices: list[str]) -> None:
        for device in devices:
            self.free[device] += min(1.0, self.sweep.gpus)

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.limit or self._lease() is None

    def take(self) -> list[str]:
        """Lease the devices of one more trial (call when not `full`)."""
        devices = self._lease() or []
        for device in devices:
            self.free[device] -= min(1.0, self.sweep.gpus)
        return devices

    def submit(self, spec: dict, tag=None) -> None:
        devices = self.take()
        if devices:
            spec = spec | {"env": spec["env"] | {"CUDA_VISIBLE_DEVICES": ",".join(devices)}}
        self.pending[self.pool.submit(self._attempts, spec)] = (spec, tag, devices)

    def _attempts(self, spec: dict) -> TrialResult:
        """Run the trial; again when a signal killed it (up to --retries times)."""
        for attempt in range(self.sweep.retries + 1):
            try:
                return run_trial(spec)
            except TrialKilled as killed:
                if self.stopping or attempt == self.sweep.retries:
                    tried = f" (after {attempt} retries)" if attempt else ""
                    return TrialResult.lost(spec["name"], spec["params"], f"{killed}{tried}")
                log.warning("%s: %s; retry %d of %d", spec["name"], killed, attempt + 1, self.sweep.retries)
        raise AssertionError("unreachable")

    def next_result(self) -> tuple[TrialResult, object]:
        """Wait for any submitted trial (in short waits, so that Ctrl-C reaches the driver at once)."""
        while True:
            done, _ = wait(list(self.pending), timeout=1.0, return_when=FIRST_COMPLETED)
            if done:
                break
        future = done.pop()
        spec, tag, devices = self.pending.pop(future)
        self._release(devices)
        try:
            return future.result(), tag
        except Exception as error:  # noqa: BLE001 - a bug or an OS error in the trial's thread: one line
            return TrialResult.lost(spec["name"], spec["params"], f"{type(error).__name__}: {error}"[:300]), tag

    def close(self) -> None:
        """Stop the trials still running (their commands' process groups) and the threads."""
        self.stopping = True
        if self.pending:
            log.warning("stopping %d running trial(s)", stop_active())
        self.pool.shutdown(wait=True, cancel_futures=True)
