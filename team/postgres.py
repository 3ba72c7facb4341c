"""A private PostgreSQL cluster for the tracking server: found, initialised, started and stopped.

- Server programs (`find_bindir`): the machine's own (`initdb` on PATH, else `pg_config --bindir`),
  else the build bundled by the PyPI package `pgserver` (part of `.[server]`).
- The cluster lives in `<folder>/data`, listens on 127.0.0.1:<port> over TCP only (no Unix
  socket) and requires a password (scram-sha-256) for the superuser `postgres`.
- PostgreSQL refuses to run as root: as root, its programs run as an unprivileged user
  (`nobody` by default) through `runuser`, and the folder is handed to that user.
- `pg_ctl` keeps the server's PID in `data/postmaster.pid`; stopping uses it.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from team import TeamError

log = logging.getLogger(__name__)

SUPERUSER = "postgres"


def find_bindir() -> tuple[Path, str]:
    """(folder with initdb, pg_ctl and postgres; where it came from)."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent, "the machine's PostgreSQL (initdb on PATH)"
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = Path(result.stdout.strip())
        if result.returncode == 0 and (bindir / "initdb").is_file():
            return bindir, "the machine's PostgreSQL (pg_config --bindir)"
    try:
        import pgserver
    except ImportError:
        pgserver = None
    if pgserver is not None:
        bindir = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if (bindir / "initdb").is_file():
            return bindir, "the pip package pgserver's bundled PostgreSQL"
    raise TeamError(
        "no PostgreSQL server programs found: install your system's PostgreSQL server "
        "(e.g. apt-get install postgresql) or the pip build with `pip install -e '.[server]'`"
    )


class Cluster:
    """One PostgreSQL cluster in `folder` (data/, postgres.log), on 127.0.0.1:`port`.

    Args:
        folder: its own folder (created; handed to `run_as` when running as root).
        port: TCP port on 127.0.0.1.
        password: the superuser's password (set at initdb, required by every connection).
        run_as: the unprivileged user PostgreSQL runs as when this process is root.
    """

    def __init__(self, folder: Path, port: int, password: str, run_as: str = "nobody", bindir: Path | None = None):
        self.folder = Path(folder).resolve()
        self.data = self.folder / "data"
        self.logfile = self.folder / "postgres.log"
        self.port = port
        self.password = password
        self.run_as = run_as if os.geteuid() == 0 else None
        self.bindir, self.source = (bindir, "given") if bindir else find_bindir()

    # ------------------------------------------------------------------ commands
    def _command(self, program: str, *args: str) -> list[str]:
        command = [str(self.bindir / program), *args]
        return self._as_user(command) if self.run_as else command

    def _as_user(self, command: list[str]) -> list[str]:
        """`command` run as `run_as` through util-linux's runuser (found also where root's PATH lacks sbin)."""
        runuser = shutil.which("runuser") or next(
            (path for path in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(path, os.X_OK)), None
        )
        if runuser is None:
            raise TeamError(
                f"running as root, PostgreSQL must run as {self.run_as!r}: that needs `runuser` "
                "(util-linux), found neither on PATH nor in /usr/sbin or /sbin"
            )
        return [runuser, "-u", self.run_as, "--", *command]

    def _run(self, program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(self._command(program, *args), capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise TeamError(f"PostgreSQL {program} failed in {self.data}: {' | '.join(tail)} (log: {self.logfile})")
        return result

    def _hand_over(self, path: Path) -> None:
        """Give a path to the unprivileged user (root only); its parents must let that user through."""
        if not self.run_as:
            return
        user = pwd.getpwnam(self.run_as)
        os.chown(path, user.pw_uid, user.pw_gid)
        probe = subprocess.run(self._as_user(["test", "-w", str(path)]), capture_output=True)
        if probe.returncode != 0:
            raise TeamError(
                f"{path}: user {self.run_as!r} (PostgreSQL does not run as root) cannot reach it; "
                "choose a state folder whose parents are world-executable (e.g. under /tmp or the repo)"
            )

    # ------------------------------------------------------------------ lifecycle
    @property
    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> None:
        """initdb: a new cluster with a password-protected superuser (about 1 s)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        self._hand_over(self.folder)
        with tempfile.NamedTemporaryFile("w", dir=self.folder, delete=False) as pwfile:
            pwfile.write(self.password + "\n")
        try:
            self._hand_over(Path(pwfile.name))
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile.name}",
                "-E",
                "UTF8",
                "--no-sync",
            )
        finally:
            os.unlink(pwfile.name)
        log.info("PostgreSQL cluster initialised in %s", self.data)

    def pid(self) -> int | None:
        """The postmaster's PID when it runs (from data/postmaster.pid), else None."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        if self.pid():
            log.info("PostgreSQL already runs (pid %s)", self.pid())
            return
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", options, "-w", "-t", "60", "start")
        log.info("PostgreSQL started on 127.0.0.1:%d (pid %s)", self.port, self.pid())

    def stop(self) -> None:
        if not self.pid():
            return
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        log.info("PostgreSQL stopped")

    # ------------------------------------------------------------------ databases
    def uri(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def ensure_database(self, name: str) -> None:
        """CREATE DATABASE name unless it exists."""
        import psycopg

        with psycopg.connect(self.uri("postgres"), autocommit=True, connect_timeout=10) as connection:
            exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                connection.execute(f'CREATE DATABASE "{name}"')
                log.info("created database %s", name)

    def settings(self) -> dict[str, str]:
        """The server settings that matter for throughput (for the benchmark's report)."""
        import psycopg

        names = (
            "server_version",
            "shared_buffers",
            "max_connections",
            "synchronous_commit",
            "fsync",
            "wal_level",
            "work_mem",
            "effective_cache_size",
        )
        with psycopg.connect(self.uri("postgres"), connect_timeout=10) as connection:
            rows = connection.execute(
                "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", (list(names),)
            ).fetchall()
        return {name: f"{setting}{' x ' + unit if unit else ''}" for name, setting, unit in rows}
