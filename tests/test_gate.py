"""The CI metric gate: thresholds, reference kinds (file, folder, git revision), exit status, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.gate import main as gate
from stages.lib.gate import judge
from stages.lib.params import GateCheck

REPO = Path(__file__).resolve().parents[1]
CHECKS = {
    "evaluate.finetuned.accuracy": {"min": 0.8, "max_drop": 0.02},
    "evaluate.finetuned.log_loss": {"max_rise": 0.1},
    "export.onnx.top1_agreement": {"min": 0.99},
}
METRICS = {
    "evaluate": {"finetuned": {"accuracy": 0.95, "log_loss": 0.20, "ece": 0.03}, "baseline": {"accuracy": 0.9}},
    "export": {"onnx": {"top1_agreement": 1.0, "max_abs_logit_diff": 1e-5}},
}


def write_metrics(folder: Path, metrics: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, content in metrics.items():
        (folder / f"{stem}.json").write_text(json.dumps(content))


def degraded(accuracy: float) -> dict:
    metrics = json.loads(json.dumps(METRICS))
    metrics["evaluate"]["finetuned"]["accuracy"] = accuracy
    return metrics


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with params.yaml (this project's, with CHECKS as the gate) and current metrics."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["gate"] = {"metrics_dir": "metrics", "checks": CHECKS}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_metrics(tmp_path / "metrics", METRICS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_thresholds():
    check = GateCheck(min=0.8, max_drop=0.02)
    assert judge("m", check, 0.95, 0.95).passed
    assert judge("m", check, 0.93, 0.95).passed  # a drop exactly at max_drop passes
    assert judge("m", check, 0.92, 0.95).failures == ["dropped 0.03 > max_drop 0.02"]
    assert judge("m", check, 0.79, 0.79).failures == ["below min 0.8"]
    assert judge("m", check, 0.90, None).passed and judge("m", check, 0.90, None).note == "no reference value"
    assert judge("m", check, None, 0.9).failures == ["missing from the current metrics"]
    lower_is_better = GateCheck(max=0.5, max_rise=0.1)
    assert judge("m", lower_is_better, 0.25, 0.2).passed
    assert judge("m", lower_is_better, 0.35, 0.2).failures == ["rose 0.15 > max_rise 0.1"]
    assert judge("m", lower_is_better, 0.6, 0.6).failures == ["above max 0.5"]
    with pytest.raises(ValueError, match="at least one"):
        GateCheck()


def test_passes_on_equal_metrics_and_prints_the_table(project, capsys):
    write_metrics(project / "reference", METRICS)
    assert gate(["--against", "reference", "--report", "gate.md"]) == 0
    table = capsys.readouterr().out
    assert "**Metric gate: pass** (3 checks)" in table
    assert "| `evaluate.finetuned.accuracy` | 0.9500 | 0.9500 | +0.0000 | ✅ pass |" in table
    assert (project / "gate.md").read_text() == table.rstrip("\n") + "\n"


def test_fails_on_a_degraded_model(project, capsys):
    write_metrics(project / "reference", METRICS)
    write_metrics(project / "metrics", degraded(0.90))
    assert gate(["--against", "reference"]) == 1
    table = capsys.readouterr().out
    assert "**Metric gate: FAIL** (1 of 3 checks)" in table
    assert "| `evaluate.finetuned.accuracy` | 0.9500 | 0.9000 | -0.0500 | ❌ dropped 0.05 > max_drop 0.02 |" in table


def test_reference_file_written_and_read_back(project, capsys):
    assert gate(["--write-reference", "ci/reference.json"]) == 0
    assert json.loads((project / "ci/reference.json").read_text()) == METRICS
    assert gate(["--against", "ci/reference.json"]) == 0
    write_metrics(project / "metrics", degraded(0.5))
    assert gate(["--against", "ci/reference.json"]) == 1
    assert "below min 0.8" in capsys.readouterr().out
    # one metrics file is a reference for its own metrics only
    write_metrics(project / "old", METRICS)
    assert gate(["--against", "old/evaluate.json"]) == 1
    table = capsys.readouterr().out
    assert "| `evaluate.finetuned.accuracy` | 0.9500 | 0.5000 | -0.4500 |" in table
    assert "| `export.onnx.top1_agreement` | — | 1.0000 | — | ✅ pass |" in table


def test_git_revision_as_reference(project, capsys):
    def git(*args):
        subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "empty")
    git("add", "metrics")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "metrics")
    assert gate(["--against", "HEAD"]) == 0
    write_metrics(project / "metrics", degraded(0.9))
    assert gate(["--against", "HEAD"]) == 1
    assert "| 0.9500 | 0.9000 | -0.0500 |" in capsys.readouterr().out
    # a revision without metrics files: absolute bounds still apply, changes are not judged
    write_metrics(project / "metrics", METRICS)
    assert gate(["--against", "HEAD~1"]) == 0
    assert "no reference value" in capsys.readouterr().out


def test_unusable_inputs_exit_2_with_a_clear_message(project, capsys):
    assert gate(["--against", "no-such-ref"]) == 2
    assert "--against no-such-ref: neither a metrics file or folder nor a git revision" in capsys.readouterr().err
    (project / "metrics/export.json").unlink()
    assert gate(["--against", "metrics"]) == 2
    assert "metrics/export.json: metrics file not found" in capsys.readouterr().err


def test_command_line_starts_fast_and_sets_the_exit_status(project):
    write_metrics(project / "reference", METRICS)
    write_metrics(project / "metrics", degraded(0.9))
    command = [sys.executable, "-X", "importtime", "-m", "stages.gate", "--against", "reference"]
    result = subprocess.run(command, cwd=project, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and "FAIL" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "mlflow", "timm", "sklearn", "pandas", "great_expectations"}
