"""Users of a basic-auth tracking server, as its admin (MLflow's own auth client).

    python -m team.users add alice --role writer      # prints a generated password unless --password
    python -m team.users add bob                      # --role reader
    python -m team.users password alice [--password NEW]

Roles, on the pipeline's experiment and registered model (params.yaml's `mlflow` section, created
by the admin when missing, so that every writer logs into the same experiment and registers
versions of the same model):
- reader: nothing granted; the server's default permission READ applies (see everything, change nothing).
- writer: EDIT on the experiment (runs, metrics, artifacts) and MANAGE on the registered model:
  MLflow's basic-auth asks for MANAGE to delete an alias, and evaluate removes @challenger when the
  newest version becomes @champion.
The admin's credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD when set, else from the
server's secrets file.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

import yaml

from team import TeamError
from team.server import ADMIN

ROLES = {"reader": None, "writer": {"experiment": "EDIT", "registered_model": "MANAGE"}}


def admin_environment(home: Path) -> None:
    """Authenticate as the admin (env wins; else <home>/secrets.json)."""
    if os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        return
    path = home / "secrets.json"
    if not path.exists():
        raise TeamError(f"{path}: missing; set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD to the admin's")
    os.environ["MLFLOW_TRACKING_USERNAME"] = ADMIN
    os.environ["MLFLOW_TRACKING_PASSWORD"] = json.loads(path.read_text())["admin_password"]


def pipeline_resources(params_file: Path) -> tuple[str, str]:
    """(experiment name, registered model name) from params.yaml's `mlflow` section."""
    section = (yaml.safe_load(params_file.read_text()) or {}).get("mlflow") or {}
    try:
        return section["experiment"], section["registered_model"]
    except KeyError as missing:
        raise TeamError(f"{params_file}: mlflow.{missing.args[0]} is not set") from None


def grant(tracking_uri: str, username: str, permissions: dict[str, str], experiment: str, model: str) -> None:
    """Grant {resource type: permission} on the experiment and registered model (each created when missing)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    try:
        client.get_registered_model(model)
    except MlflowException:
        client.create_registered_model(model)
    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    auth.grant_user_permission(username, "experiment", experiment_id, permissions["experiment"])
    auth.grant_user_permission(username, "registered_model", model, permissions["registered_model"])


def add_user(tracking_uri: str, username: str, password: str, role: str, experiment: str, model: str) -> None:
    from mlflow.server import get_app_client

    get_app_client("basic-auth", tracking_uri=tracking_uri).create_user(username, password)
    if ROLES[role]:
        grant(tracking_uri, username, ROLES[role], experiment, model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["add", "password"])
    parser.add_argument("username")
    parser.add_argument("--password", help="default: a generated one, printed once")
    parser.add_argument(
        "--role",
        choices=sorted(ROLES),
        default="reader",
        help="reader (default) or writer, on the pipeline's experiment and registered model",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("TEAM_HOME", ".team")))
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        if not uri:
            raise TeamError("MLFLOW_TRACKING_URI is not set (the server's URL, printed by `make server AUTH=1`)")
        admin_environment(args.home)
        password = args.password or secrets.token_urlsafe(12)
        if args.action == "add":
            experiment, model = pipeline_resources(args.params)
            add_user(uri, args.username, password, args.role, experiment, model)
            print(f"user {args.username}: {args.role} of experiment {experiment!r} and model {model!r}")
        else:
            from mlflow.server import get_app_client

            get_app_client("basic-auth", tracking_uri=uri).update_user_password(args.username, password)
            print(f"user {args.username}: password changed")
        if not args.password:
            print(f"password: {password}")
    except TeamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except MlflowException as error:
        print(f"error: {uri}: {error.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
