"""What a sweep's trial gives back, and where its experiment lives in git.

- `TrialResult`: the one type a trial returns (built by `TrialResult.start`, filled in by the trial or by
  the driver when the trial could not report), read by the reports and Optuna's loop.
- `exp_ref` / `exps_prefix`: DVC's layout of an experiment's git ref, `refs/exps/<commit[:2]>/<commit[2:]>/<name>`,
  written here only.
- `objective_from_ref`: a metric of an experiment read from its ref's commit (`git show ref:path`).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from team.overrides import Objective

FINISHED = ("ok", "exists")  # statuses of a trial whose experiment exists


def exps_prefix(commit: str) -> str:
    """The git ref folder of every experiment of baseline `commit` (DVC's layout)."""
    return f"refs/exps/{commit[:2]}/{commit[2:]}/"


def exp_ref(commit: str, name: str) -> str:
    """The git ref of experiment `name` of baseline `commit`."""
    return exps_prefix(commit) + name


def objective_from_ref(repo: Path, ref: str, objective: Objective) -> float | None:
    """The objective's value in the commit `ref` of the repository at `repo`; None when absent."""
    shown = subprocess.run(
        ["git", "show", f"{ref}:{objective.path}"], cwd=repo, capture_output=True, text=True, timeout=60
    )
    return objective.value(shown.stdout) if shown.returncode == 0 else None


@dataclass
class TrialResult:
    """One trial of a sweep. Args:
    name: the DVC experiment's name (`<sweep>-<n>`).
    params: the trial's overrides {key: value}.
    status: ok (ran and pushed) | exists (an earlier run of the sweep made it) | failed.
    objective: the objective's value, when the sweep has one and the metric exists.
    error: one line saying why the trial failed.
    node: where it ran (Ray's node address and id, or the host name).
    duration_s: seconds from the trial's start to its end.
    timings: seconds per step (git clone, dvc exp run, ...).
    """

    name: str
    params: dict[str, str]
    status: str = "failed"
    objective: float | None = None
    error: str = ""
    node: str = ""
    duration_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, name: str, params: dict[str, str], node: str = "") -> "TrialResult":
        """A trial before it ran: failed until it says otherwise."""
        return cls(name=name, params=dict(params), node=node)

    @classmethod
    def found(cls, name: str, params: dict[str, str]) -> "TrialResult":
        """A trial whose experiment an earlier run of the sweep already made."""
        return cls(name=name, params=dict(params), status="exists")

    @classmethod
    def lost(cls, name: str, params: dict[str, str], error: str) -> "TrialResult":
        """A trial that could not report (its task or process was lost beyond its retries)."""
        return cls(name=name, params=dict(params), error=error)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def best(results: list[TrialResult], objective: Objective | None) -> TrialResult | None:
    """The finished trial with the best objective (None without an objective or a value)."""
    chosen = None
    for result in results:
        if objective and result.finished and objective.better(result.objective, chosen and chosen.objective):
            chosen = result
    return chosen
