"""Choosing the backbone: fusion, the embedding cache per candidate, the selection rule, the outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import dvc, mlflow_runs

from stages.lib.core.errors import PipelineError
from stages.lib.core.params import ParamsError, Select, parse_params
from stages.lib.model.backbones import create_backbone
from stages.lib.training.leaderboard import Entry, SelectionError, choose, leaderboard
from stages.lib.training.probe import cache_file, cache_key, extract_embeddings, fit_probe, prune_cache

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CANDIDATES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


# ---------------------------------------------------------------------------------- fusion
@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return create_backbone("tf_efficientnet_lite0", "none", num_classes=10)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)


def test_fusion_appends_the_pooled_last_stages(lite0, images):
    plain = extract_embeddings(lite0, images, [0.5] * 3, [0.5] * 3, batch_size=2)
    fused = extract_embeddings(lite0, images, [0.5] * 3, [0.5] * 3, batch_size=2, fusion_stages=2)
    stage_channels = [info["num_chs"] for info in lite0.feature_info]  # 16, 24, 40, 112, 320
    assert plain.shape == (5, lite0.num_features)
    assert fused.shape == (5, lite0.num_features + sum(stage_channels[-2:]))
    np.testing.assert_allclose(fused[:, : lite0.num_features], plain, rtol=1e-4, atol=1e-5)
    everything = extract_embeddings(lite0, images, [0.5] * 3, [0.5] * 3, batch_size=5, fusion_stages=5)
    assert everything.shape[1] == lite0.num_features + sum(stage_channels)


def test_fusion_beyond_the_backbone_stages_names_the_param(lite0, images):
    with pytest.raises(PipelineError, match=r"features.fusion_stages=6: .* has only 5 feature stages"):
        extract_embeddings(lite0, images, [0.5] * 3, [0.5] * 3, batch_size=2, fusion_stages=6)


# ----------------------------------------------------------------------------------- cache
def test_cache_key_follows_what_the_embeddings_depend_on(tmp_path):
    def path(name="tf_efficientnet_lite0", weights="pypi", fusion=0, data="d1", seed=42):
        return cache_file(tmp_path, cache_key(name, weights, 64, fusion, data, seed, "fp32"))

    assert path() == path()
    assert path().name.startswith("tf_efficientnet_lite0-pypi-64px-fusion0-") and path().parent.name == "d1"
    assert len({path(), path(fusion=2), path(data="d2"), path(weights="none"), path(name="tf_efficientnet_lite1")}) == 5
    assert path(seed=1) == path()  # pretrained weights do not depend on the seed ...
    assert path(weights="none", seed=1) != path(weights="none")  # ... random ones do
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"one")
    before = path(weights=str(weights))
    weights.write_bytes(b"two")
    assert path(weights=str(weights)) != before  # a weights file counts by its content


def test_prune_keeps_the_most_recently_used_data_versions(tmp_path):
    for age, digest in enumerate(["d4", "d3", "d2", "d1"]):  # d1 is the oldest
        (tmp_path / digest).mkdir()
        (tmp_path / digest / "model.npz").write_bytes(b"x")
        os.utime(tmp_path / digest, (1e9 - age * 100, 1e9 - age * 100))
    removed = prune_cache(tmp_path, "d1", keep=2)  # d1 is the one in use now
    assert sorted(p.name for p in removed) == ["d2", "d3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d1", "d4"]


# ------------------------------------------------------------------------------- selection
def entry(name, val, loss=0.5, params=1_000_000, latency=10.0) -> Entry:
    return Entry(
        name=name,
        weights="pypi",
        val_accuracy=val,
        val_log_loss=loss,
        C=1.0,
        params=params,
        embedding_dim=8,
        latency_ms=latency,
        features=f"{name}.npz",
    )


BOARD = [
    entry("small", 0.90, latency=4.0),
    entry("medium", 0.95, latency=8.0),
    entry("large", 0.97, latency=20.0),
    entry("large_twin", 0.97, loss=0.3, latency=21.0),
]


def test_best_val_wins_and_ties_go_to_the_lower_val_loss():
    assert choose(BOARD, Select(rule="best_val")).name == "large_twin"
    ranking = leaderboard(BOARD, choose(BOARD, Select()), Select()).set_index("candidate")
    assert ranking.index[ranking["chosen"]].tolist() == ["large_twin"]
    assert [ranking.loc[n, "rank"] for n in ("large_twin", "large", "medium", "small")] == [1, 2, 3, 4]
    tied = [entry("big", 0.9, params=9_000_000), entry("tiny", 0.9, params=1_000)]
    assert choose(tied, Select()).name == "tiny"  # same accuracy and loss: fewer parameters


def test_latency_budget_takes_the_best_that_is_fast_enough():
    assert choose(BOARD, Select(rule="latency_budget", latency_budget_ms=10.0)).name == "medium"
    assert choose(BOARD, Select(rule="latency_budget", latency_budget_ms=4.0)).name == "small"
    with pytest.raises(SelectionError, match=r"latency_budget_ms=1.0: .*fastest: small, 4.0 ms"):
        choose(BOARD, Select(rule="latency_budget", latency_budget_ms=1.0))


def test_fixed_takes_the_named_candidate_whatever_its_rank():
    assert choose(BOARD, Select(rule="fixed", name="small")).name == "small"


@pytest.mark.parametrize(
    "features, message",
    [
        (
            {"select": {"rule": "fixed", "name": "resnet50"}},
            "select.rule fixed needs select.name, one of: tf_efficientnet_lite0",
        ),
        ({"select": {"rule": "latency_budget"}}, "needs select.latency_budget_ms"),
        (
            {"candidates": [{"name": "resnet18"}, {"name": "resnet18", "weights": "none"}]},
            "each name once (repeated: resnet18)",
        ),
        (
            {"candidates": [{"name": "resnet18", "weight": "none"}]},
            "features.candidates.0.weight: unknown key (did you mean 'weights'?)",
        ),
        ({"fusion_stages": -1}, "features.fusion_stages"),
    ],
)
def test_bad_features_params_fail_naming_the_key(features, message):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["features"].update(features)
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert message in str(error.value)


def test_the_default_probes_the_three_offline_backbones_and_takes_the_best():
    features = parse_params(yaml.safe_load((REPO / "params.yaml").read_text())).features
    assert [(c.name, c.weights) for c in features.candidates] == [(name, "pypi") for name in DEFAULT_CANDIDATES]
    assert features.select.rule == "best_val" and features.fusion_stages == 3


# --------------------------------------------------------------------------- LP-FT contract
def test_a_head_that_does_not_fit_the_classifier_fails_naming_the_file(tmp_path):
    from stages.lib.training.lpft import start_from_baseline

    model = create_backbone("tf_efficientnet_lite0", "none", num_classes=10)
    torch.save({"weight": torch.ones(10, 1712), "bias": torch.zeros(10)}, tmp_path / "classifier.pt")
    with pytest.raises(
        PipelineError,
        match=r"classifier.pt: a head of shape \(10, 1712\) does not fit the classifier "
        r"\(10, 1280\)",
    ):
        start_from_baseline(model, tmp_path, fusion=None)
    torch.save({"weight": torch.ones(10, 1280), "bias": torch.zeros(10)}, tmp_path / "classifier.pt")
    start_from_baseline(model, tmp_path, fusion=None)
    assert torch.equal(model.get_classifier().weight, torch.ones(10, 1280))


def test_with_fusion_the_lpft_head_is_a_probe_on_the_classifier_columns(tmp_path):
    """The fused baseline sees more columns than the classifier; LP-FT needs a head on the classifier's own."""
    from stages.lib.core.params import Features
    from stages.lib.training.lpft import lpft_probe

    rng = np.random.default_rng(0)
    labels = {split: np.arange(40) % 4 for split in ("train", "val")}
    arrays = {f"{split}_x": rng.normal(size=(40, 12)) + labels[split][:, None] for split in labels}
    arrays |= {f"{split}_y": labels[split] for split in labels}
    np.savez(tmp_path / "emb.npz", **arrays)
    settings = Features(C=[1.0])
    fused = fit_probe(arrays["train_x"], arrays["train_y"], arrays["val_x"], arrays["val_y"], [1.0], 1000, 0)
    entry = lambda dim: Entry(
        name="m",
        weights="pypi",
        val_accuracy=1.0,
        val_log_loss=0.0,  # noqa: E731
        C=1.0,
        params=1,
        embedding_dim=12,
        latency_ms=1.0,
        features=str(tmp_path / "emb.npz"),
        classifier_dim=dim,
        probe=fused,
    )
    assert lpft_probe(entry(12), settings, seed=0) is fused
    probe = lpft_probe(entry(8), settings, seed=0)
    expected = fit_probe(
        arrays["train_x"][:, :8], arrays["train_y"], arrays["val_x"][:, :8], arrays["val_y"], [1.0], 1000, 0
    )
    assert probe.head.weight.shape == (4, 8)
    np.testing.assert_allclose(probe.head.weight, expected.head.weight)


def test_the_probe_is_the_same_on_any_core_count():
    """One BLAS thread inside the fits: the same head, bit for bit, whatever threads the stage may use."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 600))
    train_y, val_y = np.arange(800) % 4, np.arange(200) % 4
    train_x = (centres[train_y] + rng.normal(scale=3.0, size=(800, 600))).astype(np.float32)
    val_x = (centres[val_y] + rng.normal(scale=3.0, size=(200, 600))).astype(np.float32)
    heads = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            heads.append(fit_probe(train_x, train_y, val_x, val_y, [0.1, 1.0], 1000, 0))
    one, two = heads
    assert np.array_equal(one.head.weight, two.head.weight) and np.array_equal(one.head.bias, two.head.bias)
    assert one.grid == two.grid


# ----------------------------------------------------------------------- through dvc repro
def test_leaderboard_and_the_winner_probe(tiny_pipeline):
    import pandas as pd

    everything = pd.read_csv(tiny_pipeline / "reports/leaderboard.csv")
    table = everything[everything["head"] == "logreg"]  # one row per candidate: its logistic probe
    assert sorted(table["candidate"]) == DEFAULT_CANDIDATES
    assert not [column for column in everything.columns if "test" in column]  # choosing never looks at test
    assert table["val_accuracy"].between(0, 1).all() and (table["latency_ms"] > 0).all()
    assert (table["embedding_dim"] > 1280).all() and (table["params"] > 1_000_000).all()  # fused
    winner = table[table["chosen"]].iloc[0]
    assert winner["rank"] == 1 and winner["val_accuracy"] == table["val_accuracy"].max()
    board = {"winner": winner["candidate"]}
    # the default fusion_mode concat adds the winner's unfused probe and its fusion head (finetune's start)
    fusion_rows = everything[everything["head"] != "logreg"]
    assert sorted(fusion_rows["head"]) == ["concat", "logreg_prelogits"]
    assert (fusion_rows["candidate"] == board["winner"]).all() and fusion_rows["val_accuracy"].between(0, 1).all()
    assert (tiny_pipeline / "reports/leaderboard.png").stat().st_size > 10_000

    probe = json.loads((tiny_pipeline / "models/baseline/config.json").read_text())
    assert {"model", "weights", "classes", "features", "data_config", "embedding_dim"} <= set(probe)
    assert (probe["model"], probe["weights"]) == (board["winner"], "pypi")
    assert probe["features"] == f"data/features/{probe['model']}.npz"
    assert sorted(p.name for p in (tiny_pipeline / "data/features").iterdir()) == [
        f"{n}.npz" for n in DEFAULT_CANDIDATES
    ]
    arrays = np.load(tiny_pipeline / probe["features"])
    head = torch.load(tiny_pipeline / "models/baseline/head.pt", weights_only=True)
    assert arrays["train_x"].shape[1] == probe["embedding_dim"] == head["weight"].shape[1]
    lpft = torch.load(tiny_pipeline / "models/baseline/classifier.pt", weights_only=True)  # the classifier's columns
    assert lpft["weight"].shape == (len(probe["classes"]), probe["classifier_dim"]) and probe["classifier_dim"] == 1280
    baseline = json.loads((tiny_pipeline / "metrics/features.json").read_text())
    assert baseline == {"probe": {"val_accuracy": pytest.approx(winner["val_accuracy"])}}
    # finetune built the chosen backbone
    assert json.loads((tiny_pipeline / "models/finetuned/config.json").read_text())["model"] == probe["model"]

    runs = mlflow_runs(tiny_pipeline)
    features_run = runs[runs["tags.stage"] == "features"].iloc[0]
    assert features_run["tags.model.name"] == probe["model"]
    assert features_run["metrics.probe.val_accuracy"] == pytest.approx(winner["val_accuracy"])
    from mlflow.artifacts import load_dict

    table = load_dict(f"runs:/{features_run['run_id']}/leaderboard/leaderboard.json")  # mlflow.log_table's format
    candidates = [row[table["columns"].index("candidate")] for row in table["data"]]
    assert sorted(set(candidates)) == DEFAULT_CANDIDATES and len(candidates) == len(everything)


def test_adding_a_candidate_extracts_only_that_one(tiny_pipeline, tmp_path):
    project = Path(shutil.copytree(tiny_pipeline, tmp_path / "project", symlinks=True))
    cached = lambda: {p.name: p.stat().st_mtime_ns for p in (project / ".cache/features").glob("*/*.npz")}  # noqa: E731
    before = cached()
    assert len(before) == 3
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["features"]["candidates"].append({"name": "mobilenetv3_small_050", "weights": "none"})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result = dvc(project, "repro", "features")
    log = result.stdout + result.stderr
    assert log.count("extracting embeddings") == 1 and "mobilenetv3_small_050: extracting" in log
    assert log.count("embeddings from the cache") == 3
    after = cached()
    assert {name: after[name] for name in before} == before
    assert [name for name in after if name not in before][0].startswith("mobilenetv3_small_050-none-32px-")
    assert (project / "data/features/mobilenetv3_small_050.npz").is_file()
    import pandas as pd

    board = pd.read_csv(project / "reports/leaderboard.csv").query("head == 'logreg'").set_index("candidate")
    columns = np.load(project / "data/features/mobilenetv3_small_050.npz")["train_x"].shape[1]
    assert len(board) == 4 and board.loc["mobilenetv3_small_050", "embedding_dim"] == columns
    assert columns > 1024  # its 1024 pre-logits features plus the fused stages


def test_probe_head_is_exact_and_tame_with_near_constant_features():
    """The folded head reproduces the probe's predictions; a near-dead feature cannot blow up its weights."""
    from stages.lib.training.probe import fit_probe

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(120, 6)) + labels[:, None] * 0.8
    features[:, 5] = 1e-6 * rng.normal(size=120)  # a unit that (almost) never fires
    probe = fit_probe(features[::2], labels[::2], features[1::2], labels[1::2], [1.0], 1000, seed=0)
    assert np.abs(probe.head.weight).max() < 50
    predicted = probe.head.logits(features[1::2]).argmax(1)
    assert (predicted == labels[1::2]).mean() == pytest.approx(probe.val_accuracy)
