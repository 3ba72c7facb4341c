"""A local Ray cluster for sweeps: a head and N worker nodes on 127.0.0.1, each its own `ray start`.

    python -m team.cluster start [--nodes 2] [--cpus 1] [--gpus 0] [--port 6380]   # make cluster NODES=2
    python -m team.cluster status                                                  # make cluster-status
    python -m team.cluster stop                                                    # make cluster-stop

Every node is one `ray start --block` in a session of its own (the head: `--head`, the others joined to
it), with its own CPUs and, for tests, a fake GPU count (`--gpus`: Ray schedules GPU tasks on it and sets
CUDA_VISIBLE_DEVICES; no device is needed). Ray's processes of a node (gcs_server, raylet, workers,
agents) all stay in that session, so `stop` ends exactly what `start` started: SIGTERM to each
`ray start --block` (it tears its node down), then SIGKILL to whatever of its session is left; never
`ray stop`, which would kill every Ray process of the machine.

State lives in `<home>/ray/` (default `.team/ray/`): cluster.json (address, PIDs, temp dir) and one log
per node. `start` prints `export RAY_ADDRESS=...` for `python -m team.sweep`.

Networking: on Linux Ray replaces 127.0.0.1 by the machine's outward address and listens on every
interface. Where the machine has such an address, `start` refuses (one line) unless it runs inside a
private network namespace with only the loopback device (`unshare -n`), or the user accepts listening
on the network with `--allow-network` (`ALLOW_NETWORK=1`), e.g. on a cluster's private network.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from team import TeamError

log = logging.getLogger("team.cluster")

READY = "Ray runtime started"


def outward_address() -> str | None:
    """The address Ray would advertise instead of 127.0.0.1 (the source address of a route to the
    internet, as Ray finds it), or None when there is no route (a loopback-only namespace)."""
    for family, target in ((socket.AF_INET, ("8.8.8.8", 53)), (socket.AF_INET6, ("2001:4860:4860::8888", 53))):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(target)
                address = probe.getsockname()[0]
        except OSError:
            continue
        if not address.startswith("127.") and address != "::1":
            return address
    return None


def check_loopback_only(allow_network: bool = False) -> None:
    """Refuse to start Ray where it would listen on a non-loopback address (see the module's docstring)."""
    address = None if allow_network else outward_address()
    if address:
        raise TeamError(
            f"Ray would listen on {address} (all interfaces), not only 127.0.0.1: start it inside a "
            "loopback-only network namespace (as root: unshare -n -- bash -c 'ip link set lo up; exec "
            "bash', then make server/cluster/sweep there) or pass --allow-network (ALLOW_NETWORK=1)"
        )


def _ray_env() -> dict:
    return os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}


def _session_pids(sid: int) -> list[int]:
    """The live (non-zombie) processes of session `sid`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _ray_binary() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


class LocalCluster:
    """A head and `workers` worker nodes on 127.0.0.1, state in `home`. Args:
    home: state folder (cluster.json, node logs).
    workers: worker nodes besides the head.
    cpus, gpus: each node's CPUs and (fake) GPUs.
    port: the head's GCS port.
    temp_dir: Ray's temp dir (short: Unix socket paths are limited to 107 bytes).
    timeout_s: how long a node may take to start.
    """

    def __init__(
        self,
        home: Path = Path(".team/ray"),
        workers: int = 1,
        cpus: int = 1,
        gpus: int = 0,
        port: int = 6380,
        temp_dir: str | None = None,
        timeout_s: float = 90.0,
    ):
        self.home = Path(home).resolve()
        self.workers, self.cpus, self.gpus, self.port = workers, cpus, gpus, port
        self.temp_dir = temp_dir or f"/tmp/ray-{port}"
        self.timeout_s = timeout_s

    @property
    def state_file(self) -> Path:
        return self.home / "cluster.json"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def _start_node(self, name: str, head: bool, extra: list[str]) -> int:
        common = ["--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}", "--disable-usage-stats", "--block"]
        if self.gpus:
            common.append(f"--num-gpus={self.gpus}")
        if head:
            command = [
                _ray_binary(),
                "start",
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}",
                *common,
                *extra,
            ]
        else:
            command = [_ray_binary(), "start", f"--address={self.address}", *common, *extra]
        logfile = self.home / f"{name}.log"
        with open(logfile, "wb") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=_ray_env(),
            )
        deadline = time.monotonic() + self.timeout_s
        while READY not in logfile.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-10:])
                self._kill_session(process.pid)
                ended = f"exit {process.returncode}" if process.poll() is not None else "timeout"
                raise TeamError(f"ray node {name} did not start ({ended}); {logfile}:\n{tail}")
            time.sleep(0.3)
        return process.pid

    def start(self, allow_network: bool = False) -> dict:
        """Start the head and the worker nodes; wait until all are alive in the cluster. Returns the state."""
        check_loopback_only(allow_network)
        state = self.state()
        if state and self.alive(state):
            log.info("the cluster already runs at %s", state["address"])
            return state
        self.home.mkdir(parents=True, exist_ok=True)
        pids: list[int] = []
        try:
            pids.append(self._start_node("head", True, []))
            for index in range(1, self.workers + 1):
                pids.append(self._start_node(f"node{index}", False, [f"--resources={json.dumps({f'node{index}': 1})}"]))
            state = {
                "address": self.address,
                "pids": pids,
                "temp_dir": self.temp_dir,
                "nodes": self.workers + 1,
                "cpus_per_node": self.cpus,
                "gpus_per_node": self.gpus,
                "home": str(self.home),
            }
            self.state_file.write_text(json.dumps(state, indent=2) + "\n")
            self._wait_for_nodes(self.workers + 1)
        except BaseException:
            for pid in pids:
                self._kill_session(pid)
            self.state_file.unlink(missing_ok=True)
            raise
        return state

    def _wait_for_nodes(self, count: int) -> None:
        """Block until the GCS lists `count` alive nodes (a node's raylet registers after `ray start` returns)."""
        deadline = time.monotonic() + self.timeout_s
        while (alive := self.alive_nodes()) < count:
            if time.monotonic() > deadline:
                raise TeamError(f"only {alive} of {count} Ray nodes registered within {self.timeout_s:.0f} s")
            time.sleep(0.5)

    def alive_nodes(self) -> int:
        """How many nodes the head's GCS lists as alive, asked by a short-lived driver (the state API
        needs the dashboard, which the head runs without)."""
        script = (
            f"import logging, ray; ray.init(address={self.address!r}, logging_level=logging.ERROR); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        try:
            result = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, env=_ray_env(), timeout=60
            )
            return int(result.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            return 0

    @staticmethod
    def alive(state: dict) -> bool:
        return all(_session_pids(pid) for pid in state.get("pids", []))

    @staticmethod
    def _kill_session(sid: int, timeout_s: float = 20.0) -> None:
        """SIGTERM the node's `ray start --block` (it tears the node down), SIGKILL what is left of its session."""
        try:
            os.kill(sid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(sid, os.WNOHANG)
        except ChildProcessError:
            pass

    def stop(self) -> bool:
        """Stop every node `start` recorded (workers first); False when none was recorded."""
        state = self.state()
        if not state:
            return False
        for pid in reversed(state.get("pids", [])):
            self._kill_session(pid)
        self.state_file.unlink(missing_ok=True)
        return True

    def status(self) -> dict:
        state = self.state() or {}
        pids = state.get("pids", [])
        return state | {
            "running": [pid for pid in pids if _session_pids(pid)],
            "alive_nodes": self.alive_nodes() if pids and self.alive(state) else 0,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("TEAM_HOME", ".team")) / "ray")
    parser.add_argument("--nodes", type=int, default=2, help="nodes in all, the head included (default 2)")
    parser.add_argument("--cpus", type=int, default=1, help="CPUs of each node")
    parser.add_argument("--gpus", type=int, default=0, help="(fake) GPUs of each node: scheduling only")
    parser.add_argument("--port", type=int, default=6380, help="the head's GCS port")
    parser.add_argument("--temp-dir", default=None, help="Ray's temp dir (default /tmp/ray-<port>; keep it short)")
    parser.add_argument(
        "--allow-network",
        action="store_true",
        default=os.environ.get("ALLOW_NETWORK") in ("1", "yes"),
        help="start even where Ray would listen on a non-loopback address",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM as Ctrl-C: a start that is interrupted stops what it had started (its `except BaseException`)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    cluster = LocalCluster(
        args.home, workers=args.nodes - 1, cpus=args.cpus, gpus=args.gpus, port=args.port, temp_dir=args.temp_dir
    )
    try:
        if args.action == "start":
            started = time.monotonic()
            state = cluster.start(args.allow_network)
            print(
                f"Ray cluster of {state['nodes']} nodes at {state['address']} ({time.monotonic() - started:.0f} s; "
                f"{state['cpus_per_node']} CPU, {state['gpus_per_node']} GPU each; logs in {cluster.home})"
            )
            print(f"export RAY_ADDRESS={state['address']}")
        elif args.action == "stop":
            print("stopped" if cluster.stop() else "no cluster recorded in " + str(cluster.home))
        else:
            print(json.dumps(cluster.status(), indent=2))
    except TeamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
