"""The CI gate: a paired statistical test on per-image predictions, absolute floors, exit status, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.gate import main as gate
from stages.lib.evaluation.comparison import compare, predictions_frame

REPO = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]
IMAGES = 270


def predictions(wrong: int, seed: int = 0, images: int = IMAGES, offset: int = 0) -> pd.DataFrame:
    """evaluate's predictions file for a model that gets `wrong` of `images` test images wrong."""
    rng = np.random.default_rng(seed)
    labels = np.arange(images) % len(CLASSES)
    predicted = labels.copy()
    predicted[offset : offset + wrong] = (predicted[offset : offset + wrong] + 1) % len(CLASSES)
    probabilities = np.full((images, len(CLASSES)), 0.01)
    probabilities[np.arange(images), predicted] = 0.91
    paths = [f"data/images/{labels[i]}/{i:04d}.png" for i in range(images)]
    frame = predictions_frame(
        "test", "finetuned", paths, labels, probabilities + rng.uniform(0, 1e-3, probabilities.shape), CLASSES
    )
    return pd.concat([frame, predictions_frame("val", "finetuned", paths[:5], labels[:5], probabilities[:5], CLASSES)])


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with this project's params.yaml, headline metrics and predictions (2 of 270 wrong)."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for stem in {name.split(".", 1)[0] for name in params["gate"]["checks"]}:
        metrics = {
            "evaluate": {"finetuned": {"test": {"accuracy": 0.99, "ece": 0.01}}},
            "export": {
                "onnx": {"top1_agreement": 1.0},
                "onnx_fp16": {"top1_agreement": 1.0},
                "onnx_int8": {"top1_agreement": 1.0},
            },
        }[stem]
        (tmp_path / "metrics").mkdir(exist_ok=True)
        (tmp_path / "metrics" / f"{stem}.json").write_text(json.dumps(metrics))
    current = tmp_path / params["gate"]["predictions"]
    current.parent.mkdir(parents=True)
    predictions(2).to_csv(current, index=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow sets it when a test points MLflow at a store
    return tmp_path


def test_one_image_more_or_less_never_fails(project, capsys):
    for wrong in (1, 2, 3):  # the reference gets 1, 2 or 3 images wrong: never a regression
        predictions(wrong, offset=100).to_csv(project / "reference.csv", index=False)
        assert gate(["--against", "reference.csv"]) == 0, capsys.readouterr().out
    report = capsys.readouterr().out
    assert "Model gate: pass" in report and "McNemar" in report


def test_a_real_regression_fails_with_its_interval_and_p_value(project, capsys):
    predictions(20).to_csv(project / params_path(project), index=False)  # 20 of 270 wrong now
    predictions(2).to_csv(project / "reference.csv", index=False)
    assert gate(["--against", "reference.csv", "--report", "reports/gate.md"]) == 1
    report = capsys.readouterr().out
    assert "Model gate: FAIL" in report and "significant drop beyond the margin" in report
    assert "Model gate: FAIL" in (project / "reports/gate.md").read_text()


def test_a_significant_drop_within_the_margin_passes(project, capsys):
    config = yaml.safe_load((project / "params.yaml").read_text())
    config["gate"]["margin"] = {"accuracy": 0.10, "macro_f1": 0.10}
    (project / "params.yaml").write_text(yaml.safe_dump(config))
    predictions(20).to_csv(project / params_path(project), index=False)
    predictions(2).to_csv(project / "reference.csv", index=False)
    assert gate(["--against", "reference.csv"]) == 0
    assert "within the margin" in capsys.readouterr().out


def test_other_test_images_are_refused(project, capsys):
    predictions(2, images=200).to_csv(project / "reference.csv", index=False)
    assert gate(["--against", "reference.csv"]) == 2
    assert "the test images differ from reference.csv's: 70 only in the current evaluation" in capsys.readouterr().err


@pytest.mark.parametrize("against", ["metrics/evaluate.json", "metrics", "no-such-file.csv", "params.yaml"])
def test_a_reference_that_is_not_a_predictions_file_cannot_compare(project, capsys, against):
    """The likeliest mistakes (a metrics file, a folder, a typo): exit 2, "cannot compare", in one line that
    names the file; never 1, which means a regression."""
    assert gate(["--against", against]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and against in error and "Traceback" not in error


def test_an_absolute_floor_fails(project, capsys):
    (project / "metrics/evaluate.json").write_text(json.dumps({"finetuned": {"test": {"accuracy": 0.99, "ece": 0.2}}}))
    predictions(2).to_csv(project / "reference.csv", index=False)
    assert gate(["--against", "reference.csv"]) == 1
    assert "above max 0.05" in capsys.readouterr().out


def test_the_reference_is_written_and_auto_falls_back_to_it_without_a_champion(project, capsys):
    assert gate(["--write-reference", "ci/reference_predictions.csv"]) == 0
    assert gate([]) == 0  # auto: no champion in a tracking store here -> the committed reference
    assert "against `ci/reference_predictions.csv`" in capsys.readouterr().out


def test_the_statistics_on_their_own():
    labels = np.arange(IMAGES) % 10
    reference = labels.copy()
    one_more = labels.copy()
    one_more[0] = 1
    result = compare(labels, reference, one_more)
    assert result["accuracy"].p_value == 1.0 and not result["accuracy"].regressed(0.0)
    many_more = labels.copy()
    many_more[:25] = (many_more[:25] + 1) % 10
    result = compare(labels, reference, many_more)
    assert result["accuracy"].p_value < 1e-6 and result["accuracy"].ci_high < 0 and result["accuracy"].regressed(0.01)
    assert result["macro_f1"].regressed(0.01)


def test_command_line_starts_without_torch(project):
    predictions(2).to_csv(project / "reference.csv", index=False)
    command = [sys.executable, "-X", "importtime", "-m", "stages.gate", "--against", "reference.csv"]
    result = subprocess.run(
        command, cwd=project, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "timm", "great_expectations", "mlflow"}


def params_path(project: Path) -> str:
    return yaml.safe_load((project / "params.yaml").read_text())["gate"]["predictions"]
