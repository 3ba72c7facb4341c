"""The CI gate: is the current model worse than the reference beyond noise, and are the floors met?

1. A paired comparison (stages/lib/evaluation/comparison.py) of the fine-tuned model's per-image test
   predictions (`gate.predictions`, written by evaluate) with a reference's on the same images. A
   metric fails only when its drop is statistically significant (McNemar's exact test for
   accuracy, a paired bootstrap interval at `gate.confidence` for both) *and* larger than its
   practical margin (`gate.margin`): one image of 270 is 0.37 points and never fails.
2. Absolute checks on the headline metrics files (`gate.checks`: `min` / `max` per
   `<metrics file stem>.<key path>`, e.g. `evaluate.finetuned.test.ece: {max: 0.05}`).

The reference is chosen by `registry.champion.gate_reference`: an explicit predictions file, or `auto`:
the registry champion's predictions when the tracking store has a champion that is not the current model,
else the committed reference file (`gate.reference`). Different test images, or a file that is not a
predictions file: the gate refuses (exit 2).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from stages.lib.core.errors import PipelineError
from stages.lib.core.metrics_io import numeric_leaves
from stages.lib.core.params import Gate
from stages.lib.evaluation.comparison import Difference, compare, paired, read_predictions

log = logging.getLogger(__name__)
TOLERANCE = 1e-9  # a value exactly at a threshold passes


class GateError(PipelineError, ValueError):
    """The gate cannot judge: a missing metrics file, no reference."""


@dataclass
class Check:
    metric: str
    value: float | None
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


# ------------------------------------------------------------------------- absolute checks
def read_metrics(folder: Path, stems: list[str]) -> dict[str, float]:
    """`<stem>.<key path>` -> value for the metrics files `<folder>/<stem>.json`."""
    values = {}
    for stem in stems:
        path = folder / f"{stem}.json"
        try:
            values |= numeric_leaves(json.loads(path.read_text()), stem)
        except FileNotFoundError:
            raise GateError(f"{path}: not found (run `dvc repro` first)") from None
        except json.JSONDecodeError as error:
            raise GateError(f"{path}: not valid JSON ({error})") from None
    return values


def absolute_checks(checks: dict, folder: Path) -> list[Check]:
    values = read_metrics(folder, sorted({name.split(".", 1)[0] for name in checks}))
    results = []
    for name, bounds in checks.items():
        value, failures = values.get(name), []
        if value is None:
            failures.append(f"missing from {folder}/{name.split('.', 1)[0]}.json")
        elif bounds.min is not None and value < bounds.min - TOLERANCE:
            failures.append(f"below min {bounds.min:g}")
        elif bounds.max is not None and value > bounds.max + TOLERANCE:
            failures.append(f"above max {bounds.max:g}")
        results.append(Check(name, value, failures))
    return results


def statistical_checks(
    settings: Gate, reference: Path, reference_name: str, seed: int
) -> tuple[dict[str, Difference], int]:
    """(accuracy and macro-F1 differences, number of test images) of the current predictions against the reference."""
    current = read_predictions(settings.predictions, "test", "finetuned")
    labels, ref, cur = paired(read_predictions(reference, "test", "finetuned"), current, reference_name)
    return compare(labels, ref, cur, settings.confidence, settings.resamples, seed), len(labels)


# ------------------------------------------------------------------------------- report
def markdown(
    differences: dict[str, Difference], margins: dict[str, float], checks: list[Check], reference_name: str, images: int
) -> tuple[str, bool]:
    """The report (Markdown, for the job log and a pull-request comment) and whether everything passed."""
    regressed = [name for name, diff in differences.items() if diff.regressed(margins[name])]
    failed_checks = [check for check in checks if not check.passed]
    passed = not regressed and not failed_checks
    lines = [
        f"**Model gate: {'pass' if passed else 'FAIL'}** — fine-tuned model on {images} test images "
        f"against `{reference_name}`",
        "",
        "| metric | reference | current | delta | 95% interval | McNemar p | margin | verdict |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for name, diff in differences.items():
        if diff.regressed(margins[name]):
            verdict = "❌ significant drop beyond the margin"
        elif diff.delta < -margins[name]:
            verdict = "✅ drop beyond the margin, but within noise"
        elif diff.significant and diff.delta < 0:
            verdict = "✅ significant but within the margin"
        else:
            verdict = "✅ pass"
        p_value = "—" if diff.p_value is None else f"{diff.p_value:.3g}"
        lines.append(
            f"| {name} | {diff.reference:.4f} | {diff.current:.4f} | {diff.delta:+.4f} | "
            f"[{diff.ci_low:+.4f}, {diff.ci_high:+.4f}] | {p_value} | {margins[name]:g} | {verdict} |"
        )
    if checks:
        lines += ["", "| absolute check | value | verdict |", "|---|---:|---|"]
        for check in checks:
            value = "—" if check.value is None else f"{check.value:.4f}"
            lines.append(
                f"| `{check.metric}` | {value} | {'❌ ' + '; '.join(check.failures) if check.failures else '✅ pass'} |"
            )
    lines += [
        "",
        "A drop fails the gate only when it is statistically significant (the interval excludes 0 and, "
        "for accuracy, McNemar's p is below 1 - confidence) *and* larger than the margin.",
    ]
    return "\n".join(lines) + "\n", passed
