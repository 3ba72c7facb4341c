"""The whole pipeline through `dvc repro`, as a user runs it: outs, MLflow runs, caching, experiments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import dvc, mlflow_runs

SPLITS = ("train", "val", "test")
STAGES = ["validate", "split", "augment", "features", "audit", "finetune", "evaluate", "export"]
OUTS = [
    "data/manifest.csv",
    "reports/validation/validation.md",
    "metrics/validation.json",
    "data/splits/train.csv",
    "data/splits/val.csv",
    "data/splits/test.csv",
    "metrics/split.json",
    "data/prepared/train_images.npy",
    "data/prepared/meta.json",
    "reports/augment_preview.png",
    "data/features/tf_efficientnet_lite0.npz",
    "models/baseline/head.pt",
    "models/baseline/classifier.pt",
    "metrics/features.json",
    "reports/leaderboard.csv",
    "plots/fusion_weights.csv",
    "reports/fusion_weights.png",
    "models/finetuned/model.pt",
    "models/finetuned/config.json",
    "metrics/finetune.json",
    "plots/finetune_history.csv",
    "metrics/evaluate.json",
    "plots/evaluate/confusion.csv",
    "plots/evaluate/per_class_f1.csv",
    "plots/evaluate/reliability.csv",
    "reports/evaluate/confusion_finetuned.png",
    "reports/evaluate/predictions.csv",
    "reports/audit/label_issues.csv",
    "reports/audit/near_duplicates.csv",
    "reports/audit/outliers.csv",
    "reports/audit/suggested_corrections.csv",
    "reports/audit/label_issues.png",
    "reports/audit/near_duplicates.png",
    "reports/audit/outliers.png",
    "metrics/audit.json",
]


def copy_project(project: Path, destination: Path) -> Path:
    """An independent copy (workspace, git, DVC cache, MLflow store) to change freely."""
    shutil.copytree(project, destination, symlinks=True)
    return destination


def stages_run(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def test_every_out_exists(tiny_pipeline):
    missing = [out for out in OUTS if not (tiny_pipeline / out).exists()]
    assert not missing
    results = json.loads((tiny_pipeline / "metrics/evaluate.json").read_text())
    for model in ("baseline", "finetuned"):
        assert 0.0 <= results[model]["test"]["accuracy"] <= 1.0
    report = json.loads((tiny_pipeline / "reports/evaluate/metrics.json").read_text())
    assert {"macro_precision", "macro_recall", "macro_f1", "ece_uncalibrated"} <= set(report["finetuned"]["test"])


def test_metrics_files_hold_headline_numbers_only(tiny_pipeline):
    """`dvc exp show` stays readable: at most 22 numbers, none of them a timing that changes on every run."""
    shown = json.loads(dvc(tiny_pipeline, "metrics", "show", "--json").stdout)

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}.{key}")]
        return [prefix] if isinstance(node, (int, float)) and not isinstance(node, bool) else []

    names = leaves(shown)
    assert 0 < len(names) <= 22, names
    assert not [name for name in names if any(word in name for word in ("seconds", "latency", "_ms", "time"))]


def test_outputs_hold_no_run_ids_or_timings(tiny_pipeline):
    """DVC outs are pure functions of their inputs (shared through a remote, restored from the run cache)."""
    runs = mlflow_runs(tiny_pipeline)
    run_ids = set(runs["run_id"])
    for path in (tiny_pipeline / folder for folder in ("models", "reports", "metrics", "plots")):
        for file in path.rglob("*"):
            if file.is_file() and file.suffix in (".json", ".csv", ".md", ".txt"):
                text = file.read_text(errors="replace")
                assert not [run_id for run_id in run_ids if run_id in text], file


def test_one_tagged_mlflow_run_per_stage_grouped_under_a_parent(tiny_pipeline):
    runs = mlflow_runs(tiny_pipeline)
    stage_runs = runs[runs["tags.stage"].isin(STAGES)]
    assert sorted(stage_runs["tags.stage"]) == sorted(STAGES)
    data_md5 = yaml.safe_load((tiny_pipeline / "data/images.dvc").read_text())["outs"][0]["md5"]
    assert set(stage_runs["tags.data.version"]) == {data_md5}
    assert stage_runs["tags.git.commit"].str.fullmatch(r"[0-9a-f]{40}").all()
    assert set(stage_runs["tags.git.dirty"]) <= {"true", "false"}
    # one pipeline execution, one parent run
    parents = set(stage_runs["tags.mlflow.parentRunId"])
    assert len(parents) == 1 and parents <= set(runs["run_id"])
    parent = runs.set_index("run_id").loc[parents.pop()]  # it ends with the last stage: it spans the pipeline
    assert parent["status"] == "FINISHED" and parent["end_time"] >= stage_runs["end_time"].max()
    # every stage names the runs that produced its inputs
    by_stage = stage_runs.set_index("tags.stage")
    assert by_stage.loc["split", "tags.upstream.validate"] == by_stage.loc["validate", "run_id"]
    assert by_stage.loc["finetune", "tags.upstream.features"] == by_stage.loc["features", "run_id"]
    assert by_stage.loc["evaluate", "tags.upstream.finetune"] == by_stage.loc["finetune", "run_id"]
    assert by_stage.loc["audit", "tags.upstream.features"] == by_stage.loc["features", "run_id"]
    # params sections are logged
    assert by_stage.loc["finetune", "params.finetune.phases.0.name"] == "head"
    # the parent shows the execution: every params section, the headline metrics, the run behind each stage
    assert parent["params.finetune.phases.0.name"] == "head" and parent["params.model.interpolation"] == "bilinear"
    headline = json.loads((tiny_pipeline / "metrics/evaluate.json").read_text())
    assert parent["metrics.evaluate.finetuned.test.accuracy"] == pytest.approx(
        headline["finetuned"]["test"]["accuracy"]
    )
    assert all(parent[f"tags.stage.{stage}"] == by_stage.loc[stage, "run_id"] for stage in STAGES)


def test_finetuned_model_is_registered_and_aliased(tiny_pipeline):
    from mlflow import MlflowClient

    runs = mlflow_runs(tiny_pipeline).set_index("tags.stage")  # points MLflow at the project's store
    version = MlflowClient().get_model_version_by_alias("image-classifier", "champion")
    assert version.run_id == runs.loc["finetune", "run_id"]
    assert version.tags["evaluation.run_id"] == runs.loc["evaluate", "run_id"]
    results = json.loads((tiny_pipeline / "metrics/evaluate.json").read_text())["finetuned"]
    assert float(version.tags["val.accuracy"]) == pytest.approx(results["val"]["accuracy"], abs=1e-6)
    assert float(version.tags["test.accuracy"]) == pytest.approx(results["test"]["accuracy"], abs=1e-6)
    assert "challenger" not in MlflowClient().get_registered_model("image-classifier").aliases


def test_second_repro_runs_nothing(tiny_pipeline):
    result = dvc(tiny_pipeline, "repro")
    assert stages_run(result.stdout) == []
    assert "up to date" in dvc(tiny_pipeline, "status").stdout


def test_finetune_change_reruns_only_finetune_and_downstream(tiny_pipeline, tmp_path):
    project = copy_project(tiny_pipeline, tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["phases"][1]["lr"] = 2.0e-4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(dvc(project, "repro").stdout) == ["finetune", "evaluate", "export"]


def test_audit_change_reruns_only_the_audit(tiny_pipeline, tmp_path):
    project = copy_project(tiny_pipeline, tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["audit"]["folds"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(dvc(project, "repro").stdout) == ["audit"]
    audit = json.loads((project / "metrics/audit.json").read_text())
    assert set(audit) == {"label_issues", "leaks"} and audit["leaks"] == 0  # the split keeps near copies together
    images = sum(json.loads((project / "metrics/split.json").read_text())[name] for name in SPLITS)
    assert len(pd.read_csv(project / "reports/audit/outliers.csv")) == images  # every image scored


def test_exp_run_in_a_temporary_copy_logs_to_the_root_store(tiny_pipeline, tmp_path):
    project = copy_project(tiny_pipeline, tmp_path / "project")
    dvc(project, "exp", "run", "--temp", "-n", "lower-lr", "-S", "finetune.phases.1.lr=3e-4")
    runs = mlflow_runs(project)
    experiment_runs = runs[runs.get("tags.dvc.exp_name") == "lower-lr"]
    assert sorted(experiment_runs["tags.stage"]) == ["evaluate", "export", "finetune", "pipeline"]
    parent = experiment_runs.loc[experiment_runs["tags.stage"] == "pipeline"].iloc[0]
    assert set(experiment_runs["tags.mlflow.parentRunId"].dropna()) == {parent["run_id"]}
    assert parent["tags.mlflow.runName"] == "lower-lr" and parent["params.finetune.phases.1.lr"] == "0.0003"
    # the reused stages are linked from the experiment's parent: one unit in the UI
    first = runs[runs["tags.stage"] == "features"].sort_values("start_time").iloc[0]
    assert parent["tags.stage.features"] == first["run_id"]
    assert not list((project / ".dvc/tmp/exps").glob("**/mlflow.db"))


def test_a_trial_experiment_leaves_the_registry_alone(tiny_pipeline, tmp_path):
    """`-S evaluate.top_k=2` re-runs evaluate on the same trained model: the version keeps its own evaluation."""
    from mlflow import MlflowClient

    project = copy_project(tiny_pipeline, tmp_path / "project")
    mlflow_runs(project)
    before = MlflowClient().get_model_version_by_alias("image-classifier", "champion")
    dvc(project, "exp", "run", "--temp", "-n", "top2", "-S", "evaluate.top_k=2")
    after = MlflowClient().get_model_version("image-classifier", before.version)
    assert (after.tags, after.description) == (before.tags, before.description)
    runs = mlflow_runs(project)
    trial = runs[(runs.get("tags.dvc.exp_name") == "top2") & (runs["tags.stage"] == "evaluate")].iloc[0]
    assert trial["tags.registry.version"] == str(before.version)


def test_params_typo_fails_before_any_work(tiny_pipeline, tmp_path):
    project = copy_project(tiny_pipeline, tmp_path / "project")
    good = (project / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["finetune"]["phases"][0]["epoch"] = params["finetune"]["phases"][0].pop("epochs")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(project, "repro", check=False)
    assert result.returncode != 0
    assert "finetune.phases.0.epoch: unknown key (did you mean 'epochs'?)" in result.stdout + result.stderr
    assert "Updating lock file" not in result.stdout
    # nothing is lost: with the typo fixed, the previous results come back from DVC's cache, untrained
    (project / "params.yaml").write_text(good)
    restored = dvc(project, "repro")
    assert stages_run(restored.stdout) == []
    assert (project / "models/finetuned/model.pt").exists()


def test_the_plots_page_is_self_contained_with_only_the_declared_charts(tiny_pipeline, tmp_path):
    """`dvc plots show` renders without a network (vega inlined, no CDN script) and draws exactly the seven
    charts of dvc.yaml's top-level `plots` (no default line charts of plot files declared twice)."""
    import re

    dvc(tiny_pipeline, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots/index.html").read_text()
    assert not re.findall(r"<script[^>]+src=", page) and "window.vegaEmbed" in page
    declared = yaml.safe_load((tiny_pipeline / "dvc.yaml").read_text())["plots"]
    assert page.count("vegaEmbed('#") == len(declared) == 7
