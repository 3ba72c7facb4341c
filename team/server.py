"""The team's MLflow tracking server: PostgreSQL for runs and the registry, proxied artifacts,
optional basic-auth, all in the background on 127.0.0.1, started and stopped in one command.

    python -m team.server start [--auth] [--port 5000] [--pg-port 5433] [--artifacts s3://bucket/path]
    python -m team.server status
    python -m team.server stop

State lives in one git-ignored folder (`--home`, default `.team/`):
    postgres/        the PostgreSQL cluster (data/, postgres.log), unless --backend-store-uri names one
    artifacts/       the proxied artifact store, unless --artifacts names another (s3://...)
    secrets.json     generated once, mode 600: PostgreSQL password, admin password, Flask secret
    auth.ini         the basic-auth app's config (its user store is a database of the same PostgreSQL)
    mlflow.pid, mlflow.log, server.json (how the running server was started)

A restart reuses the folder: every run, metric, artifact, model version and user is kept.
The admin password and Flask secret come from MLFLOW_AUTH_ADMIN_PASSWORD and
MLFLOW_FLASK_SERVER_SECRET_KEY when set, else from secrets.json (never from the repository).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from team import TeamError
from team.postgres import Cluster

log = logging.getLogger("team.server")

TRACKING_DATABASE = "mlflow"
AUTH_DATABASE = "mlflow_auth"
ADMIN = "admin"


@dataclass
class ServerConfig:
    """How to run the server. Args:
    home: the state folder.
    host, port: where `mlflow server` listens (127.0.0.1 unless you put TLS in front).
    pg_port: the local PostgreSQL's port (unused with backend_store_uri).
    auth: run MLflow's basic-auth app (users in the database `mlflow_auth`).
    artifacts: the artifacts destination: a folder (default <home>/artifacts) or s3://bucket/prefix.
    backend_store_uri: an existing PostgreSQL database (postgresql://user:pw@host/db): no local cluster.
    auth_database_uri: with backend_store_uri and auth, the user store's database.
    workers: uvicorn workers of the server.
    default_permission: what an authenticated user may do where nothing was granted (READ).
    health_timeout_s: how long to wait for /health (a fresh database takes 20-60 s of migrations).
    """

    home: Path = Path(".team")
    host: str = "127.0.0.1"
    port: int = 5000
    pg_port: int = 5433
    auth: bool = False
    artifacts: str | None = None
    backend_store_uri: str | None = None
    auth_database_uri: str | None = None
    workers: int = 1
    default_permission: str = "READ"
    health_timeout_s: float = 240.0
    run_as: str = "nobody"

    def __post_init__(self):
        self.home = Path(self.home).resolve()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def artifacts_destination(self) -> str:
        return self.artifacts or str(self.home / "artifacts")


# ------------------------------------------------------------------------------- secrets
def load_secrets(home: Path) -> dict[str, str]:
    """The server's secrets (generated once into <home>/secrets.json, mode 600); env vars override."""
    path = home / "secrets.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    generated = {
        key: secrets.token_urlsafe(24)
        for key in ("postgres_password", "admin_password", "flask_secret")
        if key not in stored
    }
    if generated:
        home.mkdir(parents=True, exist_ok=True)
        stored |= generated
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(json.dumps(stored, indent=2) + "\n")
    return stored | {
        key: os.environ[var]
        for key, var in (
            ("admin_password", "MLFLOW_AUTH_ADMIN_PASSWORD"),
            ("flask_secret", "MLFLOW_FLASK_SERVER_SECRET_KEY"),
        )
        if os.environ.get(var)
    }


def cluster(config: ServerConfig, password: str) -> Cluster:
    return Cluster(config.home / "postgres", config.pg_port, password, run_as=config.run_as)


# ----------------------------------------------------------------------------- processes
def _pidfile(config: ServerConfig) -> Path:
    return config.home / "mlflow.pid"


def server_pid(config: ServerConfig) -> int | None:
    """The running `mlflow server`'s PID (also its process group), else None."""
    try:
        pid = int(_pidfile(config).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b"mlflow"
    return pid if b"mlflow" in cmdline else None


def health(url: str, timeout_s: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _auth_ini(config: ServerConfig, database_uri: str) -> Path:
    path = config.home / "auth.ini"
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(
        "[mlflow]\n"
        f"default_permission = {config.default_permission}\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def start(config: ServerConfig) -> dict:
    """Start PostgreSQL (unless an existing one is named) and `mlflow server`; wait for /health.
    Returns the state written to <home>/server.json. Everything started here is stopped again on failure."""
    config.home.mkdir(parents=True, exist_ok=True)
    config.home.chmod(0o755)  # PostgreSQL's unprivileged user must pass through (its own folder is 700)
    if server_pid(config):
        state = json.loads((config.home / "server.json").read_text())
        log.info("the server already runs (pid %s) at %s", server_pid(config), state["tracking_uri"])
        return state
    keys = load_secrets(config.home)
    started_pg = None
    backend = config.backend_store_uri
    auth_db = config.auth_database_uri
    postgres_source = "an existing PostgreSQL (--backend-store-uri)"
    if backend is None:
        pg = cluster(config, keys["postgres_password"])
        postgres_source = f"{pg.source}: {pg.bindir}"
        if not pg.initialised:
            pg.init()
        if not pg.pid():
            pg.start()
            started_pg = pg
        pg.ensure_database(TRACKING_DATABASE)
        backend = pg.uri(TRACKING_DATABASE)
        if config.auth:
            pg.ensure_database(AUTH_DATABASE)
            auth_db = pg.uri(AUTH_DATABASE)
    try:
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            config.host,
            "--port",
            str(config.port),
            "--workers",
            str(config.workers),
            "--serve-artifacts",
            "--artifacts-destination",
            config.artifacts_destination,
        ]
        env = os.environ | {"MLFLOW_BACKEND_STORE_URI": backend}  # not on the command line: it holds a password
        # the job runner (GenAI scorers, 8 extra processes) serves nothing this project uses
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        if config.auth:
            if not auth_db:
                raise TeamError("--auth with --backend-store-uri needs --auth-database-uri (the user store's database)")
            command += ["--app-name", "basic-auth"]
            env |= {
                "MLFLOW_AUTH_CONFIG_PATH": str(_auth_ini(config, auth_db)),
                "MLFLOW_FLASK_SERVER_SECRET_KEY": keys["flask_secret"],
                "MLFLOW_AUTH_ADMIN_PASSWORD": keys["admin_password"],
            }
        logfile = config.home / "mlflow.log"
        with open(logfile, "ab") as out:
            process = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=config.home,
            )
        _pidfile(config).write_text(f"{process.pid}\n")
        deadline = time.monotonic() + config.health_timeout_s
        while not health(config.url):
            if process.poll() is not None:
                raise TeamError(
                    f"mlflow server exited ({process.returncode}) before answering; {logfile}:\n{_log_tail(logfile)}"
                )
            if time.monotonic() > deadline:
                raise TeamError(
                    f"mlflow server did not answer {config.url}/health within "
                    f"{config.health_timeout_s:.0f} s; {logfile}:\n{_log_tail(logfile)}"
                )
            time.sleep(1)
    except BaseException:
        _stop_mlflow(config)
        if started_pg:
            started_pg.stop()
        raise
    state = {
        "tracking_uri": config.url,
        "pid": process.pid,
        "auth": config.auth,
        "artifacts_destination": config.artifacts_destination,
        "postgres": postgres_source,
        "pg_port": None if config.backend_store_uri else config.pg_port,
        "workers": config.workers,
        "home": str(config.home),
    }
    (config.home / "server.json").write_text(json.dumps(state, indent=2) + "\n")
    return state


def _stop_mlflow(config: ServerConfig, timeout_s: float = 30.0) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), SIGKILL what is left after timeout_s."""
    pid = server_pid(config)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.2)
        if _group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
        except ChildProcessError:
            pass
    _pidfile(config).unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies count as gone)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop(config: ServerConfig) -> None:
    """Stop what `start` started: the mlflow server (by its PID file) and the local PostgreSQL."""
    _stop_mlflow(config)
    if (config.home / "postgres").exists() and config.backend_store_uri is None:
        keys = load_secrets(config.home)
        cluster(config, keys["postgres_password"]).stop()
    (config.home / "server.json").unlink(missing_ok=True)


def status(config: ServerConfig) -> dict:
    pid = server_pid(config)
    state = json.loads((config.home / "server.json").read_text()) if (config.home / "server.json").exists() else {}
    postgres_pid = None
    if (config.home / "postgres/data").exists():
        postgres_pid = cluster(config, "").pid()
    url = state.get("tracking_uri", config.url)
    return state | {"mlflow_pid": pid, "postgres_pid": postgres_pid, "healthy": bool(pid) and health(url)}


# ------------------------------------------------------------------------------------ CLI
def _config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        home=args.home,
        host=args.host,
        port=args.port,
        pg_port=args.pg_port,
        auth=args.auth,
        artifacts=args.artifacts or None,
        backend_store_uri=args.backend_store_uri or None,
        auth_database_uri=args.auth_database_uri or None,
        workers=args.workers,
    )


def client_exports(state: dict, home: Path) -> list[str]:
    lines = [f"export MLFLOW_TRACKING_URI={state['tracking_uri']}"]
    if state.get("auth"):
        lines += [
            f"export MLFLOW_TRACKING_USERNAME={ADMIN}",
            'export MLFLOW_TRACKING_PASSWORD=$(python -c "import json; '
            f"print(json.load(open('{home}/secrets.json'))['admin_password'])\")"
            "   # the admin; create users with: python -m team.users add NAME --role writer",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("TEAM_HOME", ".team")), help="state folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000, help="mlflow server port")
    parser.add_argument("--pg-port", type=int, default=5433, help="local PostgreSQL port")
    parser.add_argument("--auth", action="store_true", help="basic-auth: users and permissions")
    parser.add_argument(
        "--artifacts",
        default=os.environ.get("MLFLOW_ARTIFACTS_DESTINATION"),
        help="artifacts destination: a folder or s3://bucket/prefix (default <home>/artifacts)",
    )
    parser.add_argument(
        "--backend-store-uri",
        default=os.environ.get("MLFLOW_BACKEND_STORE_URI"),
        help="an existing PostgreSQL database instead of the local cluster",
    )
    parser.add_argument(
        "--auth-database-uri",
        default=os.environ.get("MLFLOW_AUTH_DATABASE_URI"),
        help="with --backend-store-uri and --auth: the user store's database",
    )
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM as Ctrl-C: a start that is interrupted stops what it had started (its `except BaseException`)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = _config(args)
    try:
        if args.action == "start":
            started = time.monotonic()
            state = start(config)
            print(
                f"MLflow tracking server at {state['tracking_uri']} ({time.monotonic() - started:.0f} s); "
                f"PostgreSQL: {state['postgres']}; artifacts: {state['artifacts_destination']}"
                f"{'; basic-auth on' if state['auth'] else ''}"
            )
            print("\n".join(client_exports(state, config.home)))
        elif args.action == "stop":
            stop(config)
            print("stopped")
        else:
            print(json.dumps(status(config), indent=2))
    except TeamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
