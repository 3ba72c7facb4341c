"""The finetune stage: LP-FT start, resuming a killed `dvc repro`, and DDP through torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import BIN, dvc, mlflow_runs, pipeline_env, run

from stages.lib.core.params import load_params
from stages.lib.model.baseline import load_linear_head
from stages.lib.training.lpft import fingerprint, start_from_baseline
from stages.lib.training.probe import extract_embeddings

CHECKPOINTS = ".cache/checkpoints"  # dvc.yaml: finetune --checkpoints, under the repository root

STAGE_ARGS = ["--prepared", "data/prepared", "--baseline", "models/baseline", "--checkpoints", CHECKPOINTS]


def test_fine_tuning_starts_from_the_linear_probe(tmp_path):
    """LP-FT: the model's logits before any training are exactly the probe's on its embeddings."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=4)
    head = {"weight": torch.randn(4, model.num_features), "bias": torch.randn(4)}
    torch.save(head, tmp_path / "classifier.pt")
    start_from_baseline(model, tmp_path, fusion=None)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    embeddings = extract_embeddings(model, images, [0.5] * 3, [0.25] * 3, batch_size=3)
    expected = load_linear_head(tmp_path / "classifier.pt").logits(embeddings)
    with torch.inference_mode():
        inputs = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        logits = model.eval()(inputs).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_a_checkpoint_resumes_only_with_the_same_settings_and_inputs(tiny_pipeline, tmp_path):
    params = load_params(tiny_pipeline / "params.yaml")
    meta = json.loads((tiny_pipeline / "data/prepared/meta.json").read_text())
    head = tiny_pipeline / "models/baseline/classifier.pt"
    same = fingerprint(params, meta, head)
    changed = params.model_copy(update={"finetune": params.finetune.model_copy(update={"smoothing": 0.0})})
    other_head = tmp_path / "head.pt"
    other_head.write_bytes(head.read_bytes() + b"\0")
    assert fingerprint(params, meta, head) == same
    assert fingerprint(changed, meta, head) != same
    assert fingerprint(params, meta, other_head) != same


# ------------------------------------------------------------------- integration
def copy_project(project: Path, destination: Path) -> Path:
    shutil.copytree(project, destination, symlinks=True)
    return destination


def set_params(project: Path, **changes) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


PHASES = [
    {"name": "head", "trainable": "head", "epochs": 1, "lr": 1.0e-3},
    {"name": "full", "trainable": "all", "epochs": 3, "lr": 5.0e-4, "warmup_epochs": 1},
]


def history(project: Path, name: str = "plots/finetune_history.csv") -> list[dict]:
    with open(project / name) as handle:
        return list(csv.DictReader(handle))


def kill_after_first_checkpoint(project: Path, *command: str) -> int:
    """Start `dvc <command>`, SIGKILL it (and finetune) once an epoch checkpoint exists; its epoch."""
    process = subprocess.Popen(
        [str(BIN / "dvc"), *command],
        cwd=project,
        env=pipeline_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    try:
        while not list((project / CHECKPOINTS).glob("*.pt")):
            assert process.poll() is None, f"dvc {' '.join(command)} ended before the first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    [checkpoint] = (project / CHECKPOINTS).glob("*.pt")
    return torch.load(checkpoint, weights_only=False)["state"]["epoch"]


@pytest.mark.slow
def test_a_killed_experiment_resumes_and_ends_as_an_uninterrupted_run(tiny_pipeline, tmp_path):
    """A `dvc exp run --temp` (a temporary copy, as queued experiments use) killed mid-training leaves its
    checkpoint under the repository root; the next run of the same settings resumes from it, and marks the
    killed execution's runs KILLED: nothing stays RUNNING, nothing killed shows FINISHED."""
    killed = copy_project(tiny_pipeline, tmp_path / "killed")
    straight = copy_project(tiny_pipeline, tmp_path / "straight")
    for project in (killed, straight):
        set_params(project, finetune={"phases": PHASES})
    run(killed, "git", "commit", "-qam", "four epochs")
    epoch = kill_after_first_checkpoint(killed, "exp", "run", "--temp")
    assert 1 <= epoch < 4
    resumed = dvc(killed, "repro", "evaluate")  # export has nothing to say about resuming
    assert f"resuming after epoch {epoch}" in resumed.stdout + resumed.stderr
    assert not list((killed / CHECKPOINTS).glob("*.pt"))
    dvc(straight, "repro", "evaluate")
    assert history(killed) == history(straight) and len(history(straight)) == 4
    for name in ("metrics/finetune.json", "metrics/evaluate.json"):
        results = [json.loads((project / name).read_text()) for project in (killed, straight)]
        assert results[0] == results[1]
    runs = mlflow_runs(killed)
    assert not (runs["status"] == "RUNNING").any()
    finetunes = runs[runs["tags.stage"] == "finetune"].sort_values("start_time")
    assert list(finetunes["status"])[-2:] == ["KILLED", "FINISHED"]
    killed_parent = finetunes.iloc[-2]["tags.mlflow.parentRunId"]
    assert runs.set_index("run_id").loc[killed_parent, "status"] == "KILLED"


@pytest.mark.slow
def test_a_forced_rerun_reuses_the_registered_version_of_an_identical_model(tiny_pipeline, tmp_path):
    """Fine-tuning is deterministic on the CPU: `dvc repro -f -s finetune` writes the same bytes, and the
    registry keeps one version of them (no untagged duplicate without evaluation or alias)."""
    project = copy_project(tiny_pipeline, tmp_path / "project")
    before = mlflow_runs(project)
    dvc(project, "repro", "-f", "-s", "finetune")
    runs = mlflow_runs(project)
    [new] = runs[~runs["run_id"].isin(before["run_id"]) & (runs["tags.stage"] == "finetune")].to_dict("records")
    [old] = before[before["tags.stage"] == "finetune"].to_dict("records")
    assert new["tags.registered.reused"] == "true"
    assert new["tags.registered.version"] == old["tags.registered.version"]


@pytest.mark.slow
def test_torchrun_with_two_processes_matches_one_process(tiny_pipeline, tmp_path):
    """DDP on CPU (gloo): same global batches, so the same curve within rounding; rank 0 alone writes."""
    project = copy_project(tiny_pipeline, tmp_path / "project")
    # no randomness that differs between processes: no augmentation, no dropout
    set_params(
        project,
        finetune={"phases": PHASES},
        model={"drop_rate": 0.0},
        augment={"rotation": 0.0, "translate": 0.0, "scale": [1.0, 1.0]},
    )
    env = pipeline_env()
    outputs = {}
    for name, launcher in (
        ("single", [sys.executable, "-m"]),
        ("ddp", [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m"]),
    ):
        out = ["--out", f"models/{name}", "--metrics", f"metrics/{name}.json", "--history", f"plots/{name}.csv"]
        result = subprocess.run(
            [*launcher, "stages.finetune", *STAGE_ARGS, *out], cwd=project, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = result.stderr
    assert "data-parallel: 2 processes, backend gloo" in outputs["ddp"]
    single, ddp = history(project, "plots/single.csv"), history(project, "plots/ddp.csv")
    assert len(single) == len(ddp) == 4
    for one, two in zip(single, ddp):
        assert float(two["train_loss"]) == pytest.approx(float(one["train_loss"]), rel=0.02)
        assert float(two["val_loss"]) == pytest.approx(float(one["val_loss"]), rel=0.02, abs=0.01)
        assert abs(float(two["val_accuracy"]) - float(one["val_accuracy"])) <= 0.07  # one val image of 15
    # rank 0 alone logged: one finetune run per launch, the DDP one says so
    runs = mlflow_runs(project)
    finetune_runs = runs[runs["tags.stage"] == "finetune"].sort_values("start_time")
    assert list(finetune_runs["params.world_size"].iloc[-2:]) == ["1", "2"]
    assert (project / "models/ddp/model.pt").exists() and not list((project / CHECKPOINTS).glob("*.pt"))
