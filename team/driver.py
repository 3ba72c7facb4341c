"""The sweep's driver: a grid or an Optuna search, its trials handed to a runner as they fit.

`run_grid` runs every combination of the overrides; `run_optuna` asks an Optuna study (TPE, seeded)
for trials, at most the runner's `limit` at once, and tells it each result. Both skip the trials whose
experiment already exists (`Sweep.existing`: an earlier run of the same command), so running the command
again resumes. The runner (`RayRunner` here) submits a trial and hands back results as they finish.

Why Optuna's ask/tell and not Ray Tune: a trial is a whole `dvc exp run` in a clone, already a task
with resources and retries; ask/tell drives the same tasks and the same resume by experiment name with
a dozen lines, offline, where Tune would add its own trial runner, storage and checkpoint layer around
a function that reports one number at the end.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from team import TeamError
from team.overrides import Objective, grid, search_space, trial_name
from team.refusals import Prerequisites
from team.results import TrialResult, exp_ref, objective_from_ref
from team.trial import TrialKilled, remote_experiments

log = logging.getLogger("team.sweep")

PASSED_ENV = ("MLFLOW_",)  # the driver's tracking settings travel with each trial (server, credentials, TLS)


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
    local: bool = False
    cache_dir: str | None = None
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
            "cache_dir": self.cache_dir,
        }

    @property
    def where(self) -> str:
        """Where the trials' experiments go, in words."""
        return "in the workspace" if self.local else "on origin"

    def existing(self, pre: Prerequisites) -> set[str]:
        """The experiments of this commit that already exist where trials push them."""
        return remote_experiments(pre.remote, pre.commit)

    def objective_of(self, pre: Prerequisites, name: str) -> float | None:
        """The objective of an experiment that exists where trials push: its ref fetched, the metric read."""
        ref = exp_ref(pre.commit, name)
        fetched = _git_quiet(self.repo, "fetch", "-q", pre.remote, f"+{ref}:{ref}")
        return objective_from_ref(self.repo, ref, self.objective) if fetched else None


def _git_quiet(repo: Path, *args: str) -> bool:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, timeout=120).returncode == 0


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


class RayRunner:
    """Submits trials as Ray tasks (at most `limit` pending at once) and returns their results as they finish.
    Ray retries a task whose worker or node died, and one whose command was killed by a signal
    (`TrialKilled`), up to `--retries` times; a pipeline that failed by itself is not retried."""

    def __init__(self, sweep: Sweep, nodes: dict):
        import ray

        from team.trial import run_trial

        self.ray = ray
        self.task = ray.remote(run_trial)
        self.options = {
            "num_cpus": sweep.cpus,
            "num_gpus": sweep.gpus,
            "max_retries": sweep.retries,
            "retry_exceptions": [TrialKilled],
        }  # a failed pipeline fails again: only lost workers and killed commands retry
        total_cpus = sum(r.get("CPU", 0) for r in nodes.values())
        self.limit = sweep.max_concurrent or max(1, int(total_cpus // max(sweep.cpus, 1e-9)))
        self.pending: dict = {}

    def submit(self, spec: dict, tag=None) -> None:
        ref = self.task.options(**self.options, name=f"trial {spec['name']}").remote(spec)
        self.pending[ref] = (spec, tag)

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.limit

    def next_result(self) -> tuple[TrialResult, object]:
        """Wait for any submitted trial; its result (a failure of Ray itself becomes status "failed")."""
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        spec, tag = self.pending.pop(ready[0])
        try:
            return self.ray.get(ready[0]), tag
        except self.ray.exceptions.RayError as error:
            line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            return TrialResult.lost(spec["name"], spec["params"], f"{type(error).__name__}: {line}"), tag

    def close(self) -> None:
        """Nothing to stop here: Ray ends a driver's tasks when the driver goes."""


def progress(done: int, total: int, result: TrialResult, objective: Objective | None) -> None:
    """One log line per finished trial."""
    shown = f" {objective.key}={result.objective:.4f}" if objective and result.objective is not None else ""
    extra = f": {result.error}" if result.error else ""
    log.info(
        "[%d/%d] %s %s%s on %s in %.0f s%s",
        done,
        total,
        result.name,
        result.status,
        shown,
        result.node or "?",
        result.duration_s or 0,
        extra,
    )


def run_grid(sweep: Sweep, pre: Prerequisites, runner) -> list[TrialResult]:
    """Every combination of the overrides; the ones that already exist are reported, not run."""
    combos = grid(sweep.overrides)
    trials = [(trial_name(sweep.name, i + 1, len(combos)), params) for i, params in enumerate(combos)]
    existing = sweep.existing(pre)
    results = {name: TrialResult.found(name, params) for name, params in trials if name in existing}
    todo = [(name, params) for name, params in trials if name not in existing]
    log.info(
        "sweep %s: %d trials, %d already %s, %d to run (%g CPU, %g GPU each, at most %d at once)",
        sweep.name,
        len(trials),
        len(results),
        sweep.where,
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
        results[result.name] = result
        progress(done, len(trials), result, sweep.objective)
    return [results[name] for name, _ in trials]


def run_optuna(sweep: Sweep, pre: Prerequisites, runner) -> list[TrialResult]:
    """An Optuna study (TPE, seeded) asked for up to the runner's limit of trials at a time, told each result.
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
    existing = sweep.existing(pre)
    stale_numbers = set(study.user_attrs.get("stale", []))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # a killed driver's trials
        name = stale.user_attrs.get("name")
        found = f"is {sweep.where}" if name in existing else "is lost: re-asked"
        log.info("trial %s of an earlier driver %s", name, found)
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
    log.info("sweep %s: Optuna search of %d trials, %d done before", sweep.name, sweep.trials, len(counted()))
    while len(counted()) < sweep.trials or runner.pending:
        while len(counted()) < sweep.trials and not runner.full:
            trial = study.ask()
            params = {dimension.key: dimension.suggest(trial) for dimension in space}
            name = trial.user_attrs.get("name") or trial_name(sweep.name, trial.number + 1, sweep.trials)
            trial.set_user_attr("name", name)
            runner.submit(sweep.spec(pre, name, params), tag=trial)
        result, trial = runner.next_result()
        if result.status == "exists" and result.objective is None:
            result.objective = sweep.objective_of(pre, result.name)
        trial.set_user_attr("result", asdict(result))
        if result.finished and result.objective is not None:
            study.tell(trial, result.objective)
        else:
            study.tell(trial, state=TrialState.FAIL)
        progress(len([t for t in counted() if t.state.is_finished()]), sweep.trials, result, sweep.objective)
    return [TrialResult(**t.user_attrs["result"]) for t in counted() if "result" in t.user_attrs]
