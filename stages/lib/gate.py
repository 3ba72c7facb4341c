"""The CI metric gate: today's metrics against a reference, under the thresholds in `gate` params.

A checked metric is named `<metrics file stem>.<key path>`, e.g. `evaluate.finetuned.accuracy`
for `metrics/evaluate.json` -> {"finetuned": {"accuracy": ...}}. Each check may set:
`min` / `max` (absolute bounds on the current value) and `max_drop` / `max_rise` (the largest
allowed change from the reference). Without a reference value only the absolute bounds apply.

A reference is: a git revision (its committed metrics files), a folder of metrics files, a
single metrics file (`metrics/evaluate.json`), or a combined file {stem: metrics} as written
by `write_reference`. Light imports only: the gate must start fast in CI.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stages.lib import PipelineError
from stages.lib.params import GateCheck
from stages.lib.tracking import numeric_leaves

TOLERANCE = 1e-9  # a change exactly at a threshold passes


class GateError(PipelineError, ValueError):
    """The gate cannot compare: a missing metrics file, an unknown reference."""


@dataclass
class Verdict:
    metric: str
    reference: float | None
    current: float | None
    failures: list[str]
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def delta(self) -> float | None:
        return None if self.reference is None or self.current is None else self.current - self.reference


def stems_of(checks: dict[str, GateCheck]) -> list[str]:
    return sorted({name.split(".", 1)[0] for name in checks})


def _parse(text: str, source: str) -> dict:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise GateError(f"{source}: not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise GateError(f"{source}: expected a JSON object of metrics")
    return content


def read_folder(folder: Path, stems: list[str], required: bool = True) -> dict[str, float]:
    """The flat metrics of <folder>/<stem>.json for each stem."""
    values = {}
    for stem in stems:
        path = folder / f"{stem}.json"
        if not path.is_file():
            if required:
                raise GateError(f"{path}: metrics file not found (run `dvc repro` first)")
            continue
        values |= numeric_leaves(_parse(path.read_text(), str(path)), stem)
    return values


def read_file(path: Path, stems: list[str]) -> dict[str, float]:
    """A combined reference {stem: metrics}, or one metrics file named <stem>.json."""
    content = _parse(path.read_text(), str(path))
    if path.stem in stems and not set(content) & set(stems):
        return numeric_leaves(content, path.stem)
    return {name: value for stem in stems if isinstance(content.get(stem), dict)
            for name, value in numeric_leaves(content[stem], stem).items()}


def _git(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise GateError(f"git {' '.join(args)}: {error}") from None


def read_revision(revision: str, folder: Path, stems: list[str]) -> dict[str, float]:
    """The metrics files committed at a git revision (folder relative to the current directory)."""
    values = {}
    for stem in stems:
        spec = f"{revision}:./{(folder / f'{stem}.json').as_posix()}"
        shown = _git("show", spec)
        if shown.returncode == 0:
            values |= numeric_leaves(_parse(shown.stdout, spec), stem)
    return values


def is_revision(text: str) -> bool:
    return _git("rev-parse", "--verify", "--quiet", f"{text}^{{commit}}").returncode == 0


def read_reference(against: str, folder: Path, stems: list[str]) -> dict[str, float]:
    path = Path(against)
    if path.is_dir():
        return read_folder(path, stems, required=False)
    if path.is_file():
        return read_file(path, stems)
    if is_revision(against):
        return read_revision(against, folder, stems)
    raise GateError(f"--against {against}: neither a metrics file or folder nor a git revision")


def judge(name: str, check: GateCheck, current: float | None, reference: float | None) -> Verdict:
    """One metric against its thresholds."""
    verdict = Verdict(name, reference, current, [])
    if current is None:
        verdict.failures.append("missing from the current metrics")
        return verdict
    if check.min is not None and current < check.min - TOLERANCE:
        verdict.failures.append(f"below min {check.min:g}")
    if check.max is not None and current > check.max + TOLERANCE:
        verdict.failures.append(f"above max {check.max:g}")
    delta = verdict.delta
    if delta is None:
        if check.max_drop is not None or check.max_rise is not None:
            verdict.note = "no reference value"
    else:
        if check.max_drop is not None and -delta > check.max_drop + TOLERANCE:
            verdict.failures.append(f"dropped {-delta:.4g} > max_drop {check.max_drop:g}")
        if check.max_rise is not None and delta > check.max_rise + TOLERANCE:
            verdict.failures.append(f"rose {delta:.4g} > max_rise {check.max_rise:g}")
    return verdict


def judge_all(checks: dict[str, GateCheck], current: dict[str, float], reference: dict[str, float]) -> list[Verdict]:
    return [judge(name, check, current.get(name), reference.get(name)) for name, check in checks.items()]


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def markdown(verdicts: list[Verdict], against: str) -> str:
    """The gate's report: a summary line and a table of old/new/delta/verdict per checked metric."""
    failed = [verdict for verdict in verdicts if not verdict.passed]
    summary = (f"**Metric gate: FAIL** ({len(failed)} of {len(verdicts)} checks) against `{against}`" if failed
               else f"**Metric gate: pass** ({len(verdicts)} checks) against `{against}`")
    lines = [summary, "", "| metric | reference | current | delta | verdict |", "|---|---:|---:|---:|---|"]
    for verdict in verdicts:
        outcome = "❌ " + "; ".join(verdict.failures) if verdict.failures else "✅ pass"
        if verdict.note:
            outcome += f" ({verdict.note})"
        lines.append(f"| `{verdict.metric}` | {_number(verdict.reference)} | {_number(verdict.current)} | "
                     f"{_number(verdict.delta, signed=True)} | {outcome} |")
    return "\n".join(lines) + "\n"


def write_reference(path: Path, folder: Path, stems: list[str]) -> None:
    """Save today's metrics files as one combined reference {stem: metrics} (to commit for CI)."""
    combined = {stem: _parse((folder / f"{stem}.json").read_text(), stem) for stem in stems
                if (folder / f"{stem}.json").is_file()}
    if not combined:
        raise GateError(f"{folder}: none of {', '.join(f'{stem}.json' for stem in stems)} found")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(combined, indent=2, sort_keys=True) + "\n")
