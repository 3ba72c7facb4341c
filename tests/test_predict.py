"""`python -m stages.predict`: files and folders -> a CSV of top-k classes, bad files reported."""

from __future__ import annotations

import json
import shutil
import sys

import pandas as pd
import pytest
from conftest import run


@pytest.fixture
def inbox(tiny_pipeline, tmp_path):
    """A folder of two real images (one in a sub-folder), a corrupt one, a text file and a hidden file."""
    images = sorted((tiny_pipeline / "data/images").glob("*/*.png"))
    folder = tmp_path / "inbox"
    (folder / "more").mkdir(parents=True)
    shutil.copy(images[0], folder / "first.png")
    shutil.copy(images[-1], folder / "more/last.png")
    (folder / "broken.png").write_bytes(images[0].read_bytes()[:50])
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(images[0].read_bytes())
    return folder


def predict(project, *args) -> tuple[int, pd.DataFrame, str]:
    result = run(project, sys.executable, "-m", "stages.predict", *args, check=False)
    return result.returncode, result.stdout, result.stderr


def test_folder_to_csv_with_top_k_and_error_rows(tiny_pipeline, inbox, tmp_path):
    out = tmp_path / "predictions.csv"
    code, _, stderr = predict(
        tiny_pipeline, str(inbox), str(tmp_path / "missing.png"), "--top-k", "2", "--out", str(out)
    )
    assert code == 0, stderr
    table = pd.read_csv(out, keep_default_na=False, dtype={"pred_1": str, "pred_2": str})
    assert list(table.columns) == [
        "path",
        "error",
        "abstained",
        "reason",
        "ood_score",
        "pred_1",
        "prob_1",
        "pred_2",
        "prob_2",
    ]
    rows = table.set_index(table["path"].map(lambda path: path.rsplit("/", 1)[-1]))
    assert list(rows.index) == ["broken.png", "first.png", "last.png", "notes.txt", "missing.png"]
    assert rows.loc["broken.png", "error"].startswith("corrupt image")
    assert rows.loc["notes.txt", "error"] == "not an image (unrecognised format)"
    assert rows.loc["missing.png", "error"] == "file not found"
    classes = json.loads((tiny_pipeline / "models/finetuned/config.json").read_text())["classes"]
    for name in ("first.png", "last.png"):
        row = rows.loc[name]
        assert row["error"] == "" and row["pred_1"] in classes and row["pred_2"] in classes
        assert row["pred_1"] != row["pred_2"] and 1.0 >= float(row["prob_1"]) >= float(row["prob_2"]) > 0.0
    assert "broken.png: corrupt image" in stderr


def test_registered_model_gives_the_same_answers(tiny_pipeline, inbox, tmp_path):
    local, registered = tmp_path / "local.csv", tmp_path / "registered.csv"
    assert predict(tiny_pipeline, str(inbox), "--out", str(local))[0] == 0
    code, _, stderr = predict(
        tiny_pipeline, str(inbox), "--model", "models:/image-classifier@champion", "--out", str(registered)
    )
    assert code == 0, stderr
    pd.testing.assert_frame_equal(pd.read_csv(local), pd.read_csv(registered), atol=1e-5)
    assert list(pd.read_csv(local).columns)[-2:] == ["pred_3", "prob_3"]  # default --top-k 3


def test_nothing_readable_or_a_bad_model_fails_clearly(tiny_pipeline, tmp_path):
    (tmp_path / "junk.txt").write_text("nope")
    code, _, stderr = predict(tiny_pipeline, str(tmp_path / "junk.txt"), "--out", str(tmp_path / "p.csv"))
    assert code == 1 and "0 of 1 files classified" in stderr
    code, _, stderr = predict(tiny_pipeline, str(tmp_path / "junk.txt"), "--model", str(tmp_path))
    assert code == 1 and f"error: {tmp_path}: no model.pt" in stderr
