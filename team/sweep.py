"""Sweeps and seed studies on a Ray cluster: each trial a DVC experiment run by a Ray task, results back
in the workspace as DVC experiments, runs in the team's MLflow server.

    python -m team.sweep --name lr-study -S 'finetune.phases.1.lr=3e-4,1e-3' -S 'base.seed=42,1,2'   # 6 trials
    python -m team.sweep --name lr-search --search optuna --trials 8 \\
        -S 'finetune.phases.1.lr=loguniform(1e-4,1e-2)' --objective metrics/evaluate.json:finetuned.val.accuracy

The cluster is `RAY_ADDRESS` (e.g. from `make cluster`); without it Ray starts on this machine
(`ray.init()`), the same code path. Each trial is one Ray task (`team.trial.run_trial`) asking
`--cpus`/`--gpus`; Ray places it on a node with room, retries it when its worker or node dies
(`--retries`), and at most `--max-concurrent` run at once. The driver logs one line per finished
trial, writes reports/sweeps/<name>.csv and .md, pulls the experiments (`dvc exp pull origin`) and tags
each trial's MLflow parent run with the sweep (`sweep.name`, `sweep.trial`).

Before anything is submitted, it refuses (one line, naming what to set) without a git remote `origin`,
without a default DVC remote in the committed .dvc/config, without a tracking server
(MLFLOW_TRACKING_URI unset, SQLite or a local folder, or not answering), with uncommitted changes,
when the commit is not on `origin`, or when a trial asks more CPUs/GPUs than any node has.

Running the same command again resumes: trials whose experiment is already on `origin` are not run
again (`git ls-remote origin refs/exps/...`). A grid search is resumable as is; an Optuna search keeps its
study in <TEAM_HOME>/sweeps/<name>.optuna.log (Optuna's journal file).

Why Optuna's ask/tell and not Ray Tune: a trial is a whole `dvc exp run` in a clone, already a Ray
task with resources and retries; ask/tell drives the same tasks and the same resume by experiment
name with a dozen lines, offline, where Tune would add its own trial runner, storage and checkpoint
layer around a function that reports one number at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from team import TeamError
from team.overrides import Objective, check_name, grid, search_space, trial_name
from team.trial import remote_experiments

log = logging.getLogger("team.sweep")

REPORTS = Path("reports/sweeps")
OWN_OUTPUTS = (str(REPORTS) + "/",)  # the sweep's own reports do not count as uncommitted changes
PASSED_ENV = ("MLFLOW_",)  # the driver's tracking settings travel with each trial (server, credentials, TLS)


@dataclass
class Prerequisites:
    """What a sweep needs from the workspace, found by `check_prerequisites`."""

    remote: str
    commit: str
    tracking_uri: str
    experiment: str = "transfer-learning"


def _git(repo: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=timeout)


def _dvc_binary() -> str:
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.exists() else "dvc"


def check_tracking_uri(uri: str | None, timeout_s: float = 10.0) -> str:
    """The tracking server's URI, or TeamError: unset, SQLite, a local folder, or no answer."""
    if not uri:
        raise TeamError(
            "MLFLOW_TRACKING_URI is not set: a sweep logs to the team tracking server "
            "(make server, then export MLFLOW_TRACKING_URI=http://...)"
        )
    scheme = urlparse(uri).scheme
    if scheme in ("", "file", "sqlite") or (len(scheme) == 1 and uri[1:3] == ":\\"):
        raise TeamError(
            f"MLFLOW_TRACKING_URI={uri} is a local store: trials on other nodes cannot share it (SQLite has "
            "one writer, a scratch clone's store is deleted); set it to the team server (make server)"
        )
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise OSError(f"status {response.status}")
        except (OSError, urllib.error.URLError) as error:
            raise TeamError(
                f"the tracking server {uri} does not answer ({error}): start it (make server) "
                "or fix MLFLOW_TRACKING_URI"
            ) from None
    return uri


def check_prerequisites(repo: Path, env: dict | None = None) -> Prerequisites:
    """Check the workspace before anything is submitted; TeamError names what to set."""
    env = os.environ if env is None else env
    remote = _git(repo, "remote", "get-url", "origin")
    if remote.returncode != 0:
        raise TeamError("no git remote 'origin': trials clone it (git remote add origin URL && git push origin HEAD)")
    remote_url = remote.stdout.strip()
    if not Path(remote_url).is_absolute() and "://" not in remote_url and ":" not in remote_url:
        remote_url = str((repo / remote_url).resolve())  # a relative path means nothing on another node
    default = subprocess.run(
        [_dvc_binary(), "config", "--project", "core.remote"], cwd=repo, capture_output=True, text=True
    )
    if default.returncode != 0 or not default.stdout.strip():
        raise TeamError(
            "no default DVC remote in the committed .dvc/config: trials pull and push through it "
            "(dvc remote add -d NAME URL, commit .dvc/config; not --local: clones do not see it)"
        )
    tracking = check_tracking_uri(env.get("MLFLOW_TRACKING_URI"))
    status = _git(repo, "status", "--porcelain", "--untracked-files=all")
    changes = [line for line in status.stdout.splitlines() if not line[3:].startswith(OWN_OUTPUTS)]
    if status.returncode != 0 or changes:
        raise TeamError(
            f"uncommitted changes ({len(changes)} paths, e.g. {changes[0][3:] if changes else '?'}): "
            "trials run the commit, not the workspace; commit (and push) or stash them first"
        )
    commit = _git(repo, "rev-parse", "HEAD").stdout.strip()
    fetched = _git(repo, "fetch", "-q", "origin")
    if fetched.returncode != 0:
        raise TeamError(
            f"git fetch origin failed: {fetched.stderr.strip().splitlines()[-1] if fetched.stderr.strip() else '?'}"
        )
    if not _git(repo, "branch", "-r", "--contains", commit).stdout.strip():
        raise TeamError(f"commit {commit[:7]} is not on origin: push it first (git push origin HEAD)")
    experiment = "transfer-learning"
    try:
        import yaml

        experiment = yaml.safe_load((repo / "params.yaml").read_text())["mlflow"]["experiment"] or experiment
    except (OSError, KeyError, TypeError):
        pass
    return Prerequisites(remote_url, commit, tracking, experiment)


def connect(cpus: float, gpus: float) -> dict:
    """Connect to RAY_ADDRESS (else start Ray here) and check that some node can hold one trial.
    Returns the alive nodes' resources: {node address/id: {"CPU": .., "GPU": ..}}."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            from team.cluster import check_loopback_only

            check_loopback_only(os.environ.get("ALLOW_NETWORK") in ("1", "yes"))
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    nodes = {f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}": n["Resources"] for n in ray.nodes() if n["Alive"]}
    most_cpus = max((r.get("CPU", 0) for r in nodes.values()), default=0)
    most_gpus = max((r.get("GPU", 0) for r in nodes.values()), default=0)
    if gpus > most_gpus:
        raise TeamError(
            f"a trial asks {gpus:g} GPUs but no node of the cluster has more than {most_gpus:g}: "
            "lower --gpus (0 on CPU nodes) or add GPU nodes"
        )
    if cpus > most_cpus:
        raise TeamError(
            f"a trial asks {cpus:g} CPUs but no node of the cluster has more than {most_cpus:g}: lower --cpus"
        )
    return nodes


@dataclass
class Sweep:
    """One sweep's settings (the CLI's arguments)."""

    name: str
    overrides: list[str]
    objective: Objective | None = None
    search: str = "grid"
    trials: int = 0
    cpus: float = 1
    gpus: float = 0
    max_concurrent: int = 0
    retries: int = 2
    seed: int = 0
    timeout_s: float = 7200
    scratch_root: str | None = None
    repo: Path = field(default_factory=Path.cwd)

    def task_env(self, pre: Prerequisites, trial: str) -> dict:
        passed = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
        return passed | {
            "MLFLOW_TRACKING_URI": pre.tracking_uri,
            "PIPELINE_THREADS": str(max(1, int(self.cpus))),
            "MLFLOW_RUN_CONTEXT": json.dumps({"sweep.name": self.name, "sweep.trial": trial}),
        }

    def spec(self, pre: Prerequisites, name: str, params: dict) -> dict:
        return {
            "remote": pre.remote,
            "commit": pre.commit,
            "name": name,
            "params": params,
            "env": self.task_env(pre, name),
            "objective": str(self.objective) if self.objective else None,
            "scratch_root": self.scratch_root,
            "timeout_s": self.timeout_s,
        }


class Runner:
    """Submits trials as Ray tasks (at most `limit` pending at once) and returns their results as they finish."""

    def __init__(self, sweep: Sweep, nodes: dict):
        import ray

        from team.trial import run_trial

        self.ray = ray
        self.task = ray.remote(run_trial)
        self.options = {
            "num_cpus": sweep.cpus,
            "num_gpus": sweep.gpus,
            "max_retries": sweep.retries,
            "retry_exceptions": False,
        }  # a failed pipeline fails again: only lost workers retry
        total_cpus = sum(r.get("CPU", 0) for r in nodes.values())
        self.limit = sweep.max_concurrent or max(1, int(total_cpus // max(sweep.cpus, 1e-9)))
        self.pending: dict = {}

    def submit(self, spec: dict, tag=None) -> None:
        ref = self.task.options(**self.options, name=f"trial {spec['name']}").remote(spec)
        self.pending[ref] = (spec, tag)

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.limit

    def next_result(self) -> tuple[dict, object]:
        """Wait for any submitted trial; its result (a failure of Ray itself becomes status "failed")."""
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        spec, tag = self.pending.pop(ready[0])
        try:
            return self.ray.get(ready[0]), tag
        except self.ray.exceptions.RayError as error:
            line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            return {
                "name": spec["name"],
                "params": spec["params"],
                "status": "failed",
                "objective": None,
                "error": f"{type(error).__name__}: {line}",
                "node": "",
                "duration_s": 0.0,
                "timings": {},
            }, tag


def _progress(done: int, total: int, result: dict, objective: Objective | None) -> None:
    value = result.get("objective")
    shown = f" {objective.key}={value:.4f}" if objective and value is not None else ""
    extra = f": {result['error']}" if result.get("error") else ""
    log.info(
        "[%d/%d] %s %s%s on %s in %.0f s%s",
        done,
        total,
        result["name"],
        result["status"],
        shown,
        result.get("node") or "?",
        result.get("duration_s") or 0,
        extra,
    )


def run_grid(sweep: Sweep, pre: Prerequisites, nodes: dict) -> list[dict]:
    """Every combination of the overrides; the ones already on origin are reported, not run."""
    combos = grid(sweep.overrides)
    trials = [(trial_name(sweep.name, i + 1, len(combos)), params) for i, params in enumerate(combos)]
    existing = remote_experiments(pre.remote, pre.commit)
    results = {
        name: {
            "name": name,
            "params": params,
            "status": "exists",
            "objective": None,
            "error": "",
            "node": "",
            "duration_s": 0.0,
        }
        for name, params in trials
        if name in existing
    }
    todo = [(name, params) for name, params in trials if name not in existing]
    runner = Runner(sweep, nodes)
    log.info(
        "sweep %s: %d trials, %d already on origin, %d to run (%g CPU, %g GPU each, at most %d at once)",
        sweep.name,
        len(trials),
        len(results),
        len(todo),
        sweep.cpus,
        sweep.gpus,
        runner.limit,
    )
    done = len(results)
    queue = list(todo)
    while queue or runner.pending:
        while queue and not runner.full:
            name, params = queue.pop(0)
            runner.submit(sweep.spec(pre, name, params))
        result, _ = runner.next_result()
        done += 1
        results[result["name"]] = result
        _progress(done, len(trials), result, sweep.objective)
    return [results[name] for name, _ in trials]


def run_optuna(sweep: Sweep, pre: Prerequisites, nodes: dict) -> list[dict]:
    """An Optuna study (TPE, seeded) asked for up to `--max-concurrent` trials at a time, told each result.
    The study lives in a journal file: running the command again continues it."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space(sweep.overrides)
    home = Path(os.environ.get("TEAM_HOME", sweep.repo / ".team")) / "sweeps"
    home.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(home / f"{sweep.name}.optuna.log")))
    study = optuna.create_study(
        study_name=f"{sweep.name}@{pre.commit}",
        storage=storage,
        load_if_exists=True,
        direction="maximize" if sweep.objective.mode == "max" else "minimize",
        sampler=optuna.samplers.TPESampler(seed=sweep.seed, constant_liar=True),
    )
    existing = remote_experiments(pre.remote, pre.commit)
    stale_numbers = set(study.user_attrs.get("stale", []))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # a killed driver's trials
        name = stale.user_attrs.get("name")
        log.info("trial %s of an earlier driver %s", name, "is on origin" if name in existing else "is lost: re-asked")
        study.tell(stale.number, state=TrialState.FAIL)
        stale_numbers.add(stale.number)
        if name in existing:  # finished after all: asked again with its params and name, found on origin
            study.enqueue_trial(dict(stale.params), user_attrs={"name": name})
    study.set_user_attr("stale", sorted(stale_numbers))
    counted = lambda: [
        t
        for t in study.get_trials(deepcopy=False)  # noqa: E731
        if t.number not in stale_numbers and t.state != TrialState.WAITING
    ]
    runner = Runner(sweep, nodes)
    log.info("sweep %s: Optuna search of %d trials, %d done before", sweep.name, sweep.trials, len(counted()))
    while len(counted()) < sweep.trials or runner.pending:
        while len(counted()) < sweep.trials and not runner.full:
            trial = study.ask()
            params = {dimension.key: dimension.suggest(trial) for dimension in space}
            name = trial.user_attrs.get("name") or trial_name(sweep.name, trial.number + 1, sweep.trials)
            trial.set_user_attr("name", name)
            runner.submit(sweep.spec(pre, name, params), tag=trial)
        result, trial = runner.next_result()
        if result["status"] == "exists" and result["objective"] is None:
            result["objective"] = _objective_from_remote(sweep, pre, result["name"])
        trial.set_user_attr("result", result)
        if result["status"] in ("ok", "exists") and result["objective"] is not None:
            study.tell(trial, result["objective"])
        else:
            study.tell(trial, state=TrialState.FAIL)
        _progress(len([t for t in counted() if t.state.is_finished()]), sweep.trials, result, sweep.objective)
    return [t.user_attrs["result"] for t in counted() if "result" in t.user_attrs]


def _objective_from_remote(sweep: Sweep, pre: Prerequisites, name: str) -> float | None:
    """The objective of an experiment on origin: its ref fetched, its metrics file read from git."""
    ref = f"refs/exps/{pre.commit[:2]}/{pre.commit[2:]}/{name}"
    if _git(sweep.repo, "fetch", "-q", "origin", f"+{ref}:{ref}").returncode != 0:
        return None
    shown = _git(sweep.repo, "show", f"{ref}:{sweep.objective.path}")
    return sweep.objective.value(shown.stdout) if shown.returncode == 0 else None


def pull_experiments(sweep: Sweep, pre: Prerequisites, results: list[dict]) -> None:
    """`dvc exp pull origin` the finished trials (refs only: `dvc pull` after `dvc exp apply` fetches outputs),
    and fill in the objective of trials found on origin."""
    names = [r["name"] for r in results if r["status"] in ("ok", "exists")]
    if not names:
        return
    pulled = subprocess.run(
        [_dvc_binary(), "exp", "pull", "--force", "--no-cache", "origin", *names],
        cwd=sweep.repo,
        capture_output=True,
        text=True,
    )
    if pulled.returncode != 0:
        log.warning("dvc exp pull origin failed: %s", (pulled.stderr or pulled.stdout).strip()[-300:])
    if sweep.objective:
        for result in results:
            if result["status"] == "exists" and result["objective"] is None:
                ref = f"refs/exps/{pre.commit[:2]}/{pre.commit[2:]}/{result['name']}"
                shown = _git(sweep.repo, "show", f"{ref}:{sweep.objective.path}")
                result["objective"] = sweep.objective.value(shown.stdout) if shown.returncode == 0 else None


def tag_parent_runs(sweep: Sweep, pre: Prerequisites, results: list[dict]) -> int:
    """Tag each finished trial's MLflow parent run (the newest FINISHED run named by its `dvc.exp_name`)
    with the sweep; returns how many were tagged. A server that does not answer is logged, not fatal."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(pre.tracking_uri)
        experiment = client.get_experiment_by_name(pre.experiment)
        if experiment is None:
            return 0
        tagged = 0
        for result in results:
            if result["status"] not in ("ok", "exists"):
                continue
            runs = client.search_runs(
                [experiment.experiment_id],
                max_results=1,
                order_by=["attributes.start_time DESC"],
                filter_string=f"tags.`dvc.exp_name` = '{result['name']}' and tags.stage = 'pipeline'"
                " and attributes.status = 'FINISHED'",
            )
            if runs:
                for key, value in (("sweep.name", sweep.name), ("sweep.trial", result["name"])):
                    client.set_tag(runs[0].info.run_id, key, value)
                tagged += 1
        return tagged
    except Exception as error:  # noqa: BLE001 - the report matters more than the tags
        log.warning("could not tag the MLflow parent runs: %s", str(error).splitlines()[0][:200])
        return 0


def best(results: list[dict], objective: Objective | None) -> dict | None:
    chosen = None
    for result in results:
        if (
            objective
            and result["status"] in ("ok", "exists")
            and objective.better(result["objective"], chosen and chosen["objective"])
        ):
            chosen = result
    return chosen


def write_reports(sweep: Sweep, results: list[dict], folder: Path) -> tuple[Path, Path]:
    """reports/sweeps/<name>.csv (one row per trial), .md (the table and the best trial) and .json (every
    result as returned, with each trial's seconds per step)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(key for result in results for key in result["params"]))
    objective = str(sweep.objective) if sweep.objective else "objective"
    header = ["trial", *keys, objective, "status", "node", "duration_s", "error"]
    rows = [
        [
            r["name"],
            *(r["params"].get(k, "") for k in keys),
            "" if r["objective"] is None else r["objective"],
            r["status"],
            r["node"],
            r["duration_s"],
            r["error"],
        ]
        for r in results
    ]
    csv_path = folder / f"{sweep.name}.csv"
    with open(csv_path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    top = best(results, sweep.objective)
    lines = [
        f"# Sweep `{sweep.name}`",
        "",
        f"{len(results)} trials ({sweep.search}); {sum(r['status'] in ('ok', 'exists') for r in results)} finished, "
        f"{sum(r['status'] == 'failed' for r in results)} failed. Objective: "
        f"{f'`{objective}` ({sweep.objective.mode})' if sweep.objective else 'none'}.",
        "",
    ]
    if top:
        lines += [
            f"**Best trial: `{top['name']}`** {objective} = {top['objective']:.4f} with "
            + ", ".join(f"`{k}={v}`" for k, v in top["params"].items()),
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| "
        + " | ".join(
            f"{cell:.4f}" if isinstance(cell, float) and i == len(keys) + 1 else str(cell) for i, cell in enumerate(row)
        ).replace("\n", " ")
        + " |"
        for row in rows
    ]
    lines += [
        "",
        "`exists`: the experiment was already on origin (an earlier run of this sweep). "
        "See them all: `dvc exp show`; outputs of one: `dvc exp apply NAME && dvc pull`.",
    ]
    md_path = folder / f"{sweep.name}.md"
    md_path.write_text("\n".join(lines) + "\n")
    (folder / f"{sweep.name}.json").write_text(json.dumps(results, indent=2) + "\n")  # with per-step timings
    return csv_path, md_path


def run_sweep(sweep: Sweep) -> list[dict]:
    """Check, connect, run every trial, pull and report. Returns the trials' results."""
    if sweep.search == "optuna":
        if not sweep.objective:
            raise TeamError("--search optuna needs --objective (e.g. metrics/evaluate.json:finetuned.val.accuracy)")
        if sweep.trials < 1:
            raise TeamError("--search optuna needs --trials N (N >= 1)")
        search_space(sweep.overrides)
    else:
        grid(sweep.overrides)  # a bad override fails here, before the cluster is touched
    pre = check_prerequisites(sweep.repo)
    nodes = connect(sweep.cpus, sweep.gpus)
    log.info(
        "cluster: %d nodes (%s)",
        len(nodes),
        ", ".join(f"{name}: {r.get('CPU', 0):g} CPU {r.get('GPU', 0):g} GPU" for name, r in nodes.items()),
    )
    started = time.monotonic()
    results = run_optuna(sweep, pre, nodes) if sweep.search == "optuna" else run_grid(sweep, pre, nodes)
    pull_experiments(sweep, pre, results)
    tagged = tag_parent_runs(sweep, pre, results)
    csv_path, md_path = write_reports(sweep, results, sweep.repo / REPORTS)
    top = best(results, sweep.objective)
    failed = [r for r in results if r["status"] == "failed"]
    print(
        f"sweep {sweep.name}: {len(results) - len(failed)} of {len(results)} trials finished in "
        f"{time.monotonic() - started:.0f} s; {tagged} MLflow parent runs tagged sweep.name={sweep.name}; "
        f"reports: {csv_path}, {md_path}"
    )
    if top:
        print(
            f"best: {top['name']} {sweep.objective.key}={top['objective']:.4f} "
            + " ".join(f"{k}={v}" for k, v in top["params"].items())
        )
    for result in failed:
        print(f"failed: {result['name']}: {result['error']}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:5]),
    )
    parser.add_argument("--name", required=True, help="the sweep's name; trials are DVC experiments <name>-<n>")
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        help="an override in dvc exp run -S grammar; a comma list is a grid axis; with --search "
        "optuna also loguniform(a,b), uniform(a,b), int(a,b), choice(a,b,..)",
    )
    parser.add_argument("--search", choices=["grid", "optuna"], default="grid")
    parser.add_argument("--trials", type=int, default=0, help="--search optuna: how many trials")
    parser.add_argument(
        "--objective", default=None, help="a val metric FILE:KEY, e.g. metrics/evaluate.json:finetuned.val.accuracy"
    )
    parser.add_argument("--mode", choices=["max", "min"], default="max")
    parser.add_argument("--cpus", type=float, default=1, help="CPUs per trial (also its PIPELINE_THREADS)")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs per trial")
    parser.add_argument(
        "--max-concurrent", type=int, default=0, help="trials at once (default: the cluster's CPUs / --cpus)"
    )
    parser.add_argument("--retries", type=int, default=2, help="Ray retries of a trial whose worker or node died")
    parser.add_argument("--seed", type=int, default=0, help="the Optuna sampler's seed")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds one dvc exp run may take")
    parser.add_argument(
        "--scratch",
        default=os.environ.get("SWEEP_SCRATCH"),
        help="where trials clone the project on each node (default: the node's temp dir)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        objective = Objective.parse(args.objective, args.mode) if args.objective else None
        sweep = Sweep(
            name=check_name(args.name),
            overrides=args.overrides,
            objective=objective,
            search=args.search,
            trials=args.trials,
            cpus=args.cpus,
            gpus=args.gpus,
            max_concurrent=args.max_concurrent,
            retries=args.retries,
            seed=args.seed,
            timeout_s=args.timeout,
            scratch_root=args.scratch,
        )
        results = run_sweep(sweep)
    except TeamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
