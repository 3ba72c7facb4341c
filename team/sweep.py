"""Sweeps and seed studies: each trial a DVC experiment, several at once, on this machine or a Ray cluster;
results back in the workspace as DVC experiments, runs in MLflow.

    python -m team.sweep --name lr-study -S 'finetune.phases.1.lr=3e-4,1e-3' -S 'base.seed=42,1,2'   # 6 trials
    python -m team.sweep --name lr-search --search optuna --trials 8 \\
        -S 'finetune.phases.1.lr=loguniform(1e-4,1e-2)' --objective metrics/evaluate.json:finetuned.val.accuracy

On one machine (without RAY_ADDRESS and without a git remote `origin`, or with `--local`) nothing needs
setting up: trials clone the workspace, share its DVC cache and log to its own MLflow store through a
private server (team.local). With an `origin` or a cluster (`RAY_ADDRESS`, e.g. from `make cluster`;
without it Ray starts here), each trial is one Ray task (`team.trial.run_trial`) asking
`--cpus`/`--gpus`; Ray places it on a node with room, and at most `--max-concurrent` run at once.
Either way a trial whose command is killed by a signal, or whose worker or node dies, is retried
(`--retries`); one that fails by itself is not. The driver logs one line per finished trial, writes
reports/sweeps/<name>.csv and .md, brings the experiments in (on a cluster: `dvc exp pull origin`) and
tags each trial's MLflow parent run with the sweep (`sweep.name`, `sweep.trial`).

Before anything is submitted, it refuses (one line, naming what to set: team.refusals) with uncommitted
changes or when a trial asks more CPUs/GPUs than the machine or any node has; on a cluster also without
a git remote `origin`, without a default DVC remote in the committed .dvc/config, without a tracking
server, or when the commit is not on `origin`.

Running the same command again resumes: trials whose experiment already exists (in the workspace, or on
`origin`: `git ls-remote origin refs/exps/...`) are not run again. A grid search is resumable as is; an
Optuna search keeps its study in <TEAM_HOME>/sweeps/<name>.optuna.log (Optuna's journal file). Ctrl-C or
SIGTERM stops the running trials and the sweep's private server.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from team import TeamError
from team.driver import RayRunner, Sweep, connect, run_grid, run_optuna
from team.overrides import Objective, check_name, grid, search_space
from team.refusals import (
    REPORTS,
    Prerequisites,
    cache_dir,
    check_machine,
    check_prerequisites,
    check_workspace,
    dvc_binary,
    has_origin,
)
from team.reports import write_reports
from team.results import TrialResult, best, exp_ref, objective_from_ref

log = logging.getLogger("team.sweep")


def pull_experiments(sweep: Sweep, pre: Prerequisites, results: list[TrialResult]) -> None:
    """`dvc exp pull origin` the finished trials (refs only: `dvc pull` after `dvc exp apply` fetches outputs)."""
    names = [r.name for r in results if r.finished]
    if not names:
        return
    pulled = subprocess.run(
        [dvc_binary(), "exp", "pull", "--force", "--no-cache", "origin", *names],
        cwd=sweep.repo,
        capture_output=True,
        text=True,
    )
    if pulled.returncode != 0:
        log.warning("dvc exp pull origin failed: %s", (pulled.stderr or pulled.stdout).strip()[-300:])


def fill_objectives(sweep: Sweep, pre: Prerequisites, results: list[TrialResult]) -> None:
    """The objective of the trials an earlier run made, read from their refs in the workspace."""
    for result in results:
        if sweep.objective and result.status == "exists" and result.objective is None:
            result.objective = objective_from_ref(sweep.repo, exp_ref(pre.commit, result.name), sweep.objective)


def tag_parent_runs(sweep: Sweep, pre: Prerequisites, results: list[TrialResult]) -> int:
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
            if not result.finished:
                continue
            runs = client.search_runs(
                [experiment.experiment_id],
                max_results=1,
                order_by=["attributes.start_time DESC"],
                filter_string=f"tags.`dvc.exp_name` = '{result.name}' and tags.stage = 'pipeline'"
                " and attributes.status = 'FINISHED'",
            )
            if runs:
                for key, value in (("sweep.name", sweep.name), ("sweep.trial", result.name)):
                    client.set_tag(runs[0].info.run_id, key, value)
                tagged += 1
        return tagged
    except Exception as error:  # noqa: BLE001 - the report matters more than the tags
        log.warning("could not tag the MLflow parent runs: %s", str(error).splitlines()[0][:200])
        return 0


def _drive(sweep: Sweep, pre: Prerequisites, runner) -> list[TrialResult]:
    """The grid or the search on `runner`; its running trials are stopped when the driver is interrupted."""
    try:
        return run_optuna(sweep, pre, runner) if sweep.search == "optuna" else run_grid(sweep, pre, runner)
    finally:
        runner.close()


def _on_this_machine(sweep: Sweep) -> tuple[list[TrialResult], int]:
    """One machine: trials clone the workspace and share its DVC cache; the workspace's SQLite store is
    served to them by a private MLflow server for the sweep's lifetime. Returns the results and how
    many MLflow parent runs were tagged."""
    from team.local import LocalRunner, PrivateServer, ensure_experiment, machine_cores, machine_gpus

    pre, store = check_workspace(sweep.repo)
    cores, gpus = machine_cores(), machine_gpus()
    check_machine(sweep.cpus, sweep.gpus, cores, len(gpus))
    sweep.cache_dir = cache_dir(sweep.repo)
    log.info(
        "this machine: %d cores, %d GPUs; trials clone %s and share its DVC cache %s",
        cores,
        len(gpus),
        pre.remote,
        sweep.cache_dir,
    )
    home = Path(os.environ.get("TEAM_HOME", sweep.repo / ".team")) / "sweeps" / f"{sweep.name}.mlflow"
    server = PrivateServer(store, Path(pre.remote) / "mlartifacts", home) if store else None
    try:
        if server:
            pre.tracking_uri = server.start()
            ensure_experiment(pre.tracking_uri, pre.experiment, Path(pre.remote))
        results = _drive(sweep, pre, LocalRunner(sweep, cores, gpus))
        fill_objectives(sweep, pre, results)
        return results, tag_parent_runs(sweep, pre, results)
    finally:
        if server:
            server.stop()


def run_sweep(sweep: Sweep) -> list[TrialResult]:
    """Check, connect, run every trial, pull and report. Returns the trials' results."""
    if sweep.search == "optuna":
        if not sweep.objective:
            raise TeamError("--search optuna needs --objective (e.g. metrics/evaluate.json:finetuned.val.accuracy)")
        if sweep.trials < 1:
            raise TeamError("--search optuna needs --trials N (N >= 1)")
        search_space(sweep.overrides)
    else:
        grid(sweep.overrides)  # a bad override fails here, before the cluster is touched
    sweep.local = sweep.local or (not os.environ.get("RAY_ADDRESS") and not has_origin(sweep.repo))
    started = time.monotonic()
    if sweep.local:
        results, tagged = _on_this_machine(sweep)
    else:
        pre = check_prerequisites(sweep.repo)
        nodes = connect(sweep.cpus, sweep.gpus)
        log.info(
            "cluster: %d nodes (%s)",
            len(nodes),
            ", ".join(f"{name}: {r.get('CPU', 0):g} CPU {r.get('GPU', 0):g} GPU" for name, r in nodes.items()),
        )
        results = _drive(sweep, pre, RayRunner(sweep, nodes))
        pull_experiments(sweep, pre, results)
        fill_objectives(sweep, pre, results)
        tagged = tag_parent_runs(sweep, pre, results)
    csv_path, md_path = write_reports(sweep.name, sweep.search, sweep.objective, results, sweep.repo / REPORTS)
    top = best(results, sweep.objective)
    failed = [r for r in results if r.status == "failed"]
    print(
        f"sweep {sweep.name}: {len(results) - len(failed)} of {len(results)} trials finished in "
        f"{time.monotonic() - started:.0f} s; {tagged} MLflow parent runs tagged sweep.name={sweep.name}; "
        f"reports: {csv_path}, {md_path}"
    )
    if top:
        print(
            f"best: {top.name} {sweep.objective.key}={top.objective:.4f} "
            + " ".join(f"{k}={v}" for k, v in top.params.items())
        )
    for result in failed:
        print(f"failed: {result.name}: {result.error}")
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
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="retries of a trial whose process, worker or node was killed (not of one that failed by itself)",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="run on this machine from the workspace (the default without RAY_ADDRESS and without an origin)",
    )
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
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: the finally blocks stop trials and servers
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
            local=args.local,
        )
        results = run_sweep(sweep)
    except TeamError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trials and the sweep's servers were stopped", file=sys.stderr)
        return 130
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
