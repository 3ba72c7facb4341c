"""Exported files (ONNX fp32/fp16/int8, TorchScript): parity with PyTorch, recorded preprocessing,
and the export stage's outputs in a real pipeline."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import mlflow_runs
from PIL import Image

from stages.lib.data.pixels import to_float_array as as_input
from stages.lib.inference.export import (
    FILES,
    as_metadata,
    classifier_node,
    export_all,
    latency_ms,
    logits_of,
    parity,
    preprocessing,
    pytorch_runner,
    runner,
)
from stages.lib.model.backbones import NormalizedClassifier, create_backbone
from stages.lib.model.card import FinetunedCard

SIZE = 32
CONFIG = FinetunedCard(
    model="tf_efficientnet_lite0",
    num_classes=2,
    classes=["china", "flower"],
    data_config={"input_size": [3, SIZE, SIZE], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3},
)
# variant -> (largest logit difference allowed, smallest top-1 agreement)
TOLERANCE = {"onnx": (1e-3, 1.0), "torchscript": (1e-4, 1.0), "onnx_fp16": (0.25, 1.0), "onnx_int8": (None, 0.9)}


def photo_crops() -> tuple[np.ndarray, np.ndarray]:
    """24 crops of scikit-learn's two sample photos at SIZE px, labelled by photo."""
    from sklearn.datasets import load_sample_images

    crops, labels = [], []
    for label, photo in enumerate(load_sample_images().images):
        for top in (0, 100, 200, 300):
            for left in (0, 150, 300):
                crop = Image.fromarray(photo[top : top + 120, left : left + 120]).resize((SIZE, SIZE), Image.BICUBIC)
                crops.append(np.asarray(crop))
                labels.append(label)
    return np.stack(crops), np.array(labels)


def probe_model(images: np.ndarray, labels: np.ndarray) -> NormalizedClassifier:
    """ImageNet lite0 with a linear-probe head (as the pipeline starts fine-tuning), plus one very
    large weight shared by both classes: it changes no prediction, but would crush every other
    weight to zero if the head were quantized to int8 with one scale."""
    from sklearn.linear_model import LogisticRegression

    model = NormalizedClassifier(create_backbone(CONFIG.model, "pypi", 2), [0.5] * 3, [0.5] * 3).eval()
    with torch.inference_mode():
        inputs = (torch.from_numpy(as_input(images)) - 0.5) / 0.5
        features = model.model.forward_head(model.model.forward_features(inputs), pre_logits=True).numpy()
    probe = LogisticRegression(C=100, max_iter=3000).fit(features, labels)
    weight = np.concatenate([-probe.coef_, probe.coef_]) / 2
    weight[:, features.mean(0).argmin()] += 500.0
    with torch.no_grad():
        model.model.classifier.weight.copy_(torch.from_numpy(weight))
        model.model.classifier.bias.copy_(torch.from_numpy(np.concatenate([-probe.intercept_, probe.intercept_]) / 2))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    images, labels = photo_crops()
    model = probe_model(images, labels)
    folder, workdir = tmp_path_factory.mktemp("export"), tmp_path_factory.mktemp("workdir")
    previous = os.getcwd()
    os.chdir(workdir)  # where a repository would be: the exporters must leave no scratch files there
    try:
        files = export_all(list(FILES), model, folder, SIZE, 17, preprocessing(CONFIG), calibration=images)
    finally:
        os.chdir(previous)
    return model, images, labels, files, workdir


def test_exporting_leaves_no_scratch_files_in_the_working_directory(exported):
    assert list(exported[4].iterdir()) == []


@pytest.mark.parametrize("variant", list(TOLERANCE))
def test_each_variant_agrees_with_pytorch(exported, variant):
    model, images, labels, files, _ = exported
    reference = logits_of(pytorch_runner(model), images, 8)
    assert (reference.argmax(1) == labels).mean() == 1.0  # the probe separates the two photos
    result = parity(reference, logits_of(runner(variant, files[variant], 1), images, 8), labels)
    max_diff, min_agreement = TOLERANCE[variant]
    if max_diff is not None:
        assert result["max_abs_logit_diff"] <= max_diff
    assert result["top1_agreement"] >= min_agreement
    assert result["accuracy_delta"] == pytest.approx(result["accuracy"] - 1.0)


def test_smaller_variants_are_smaller(exported):
    import onnx

    files = exported[3]
    full = files["onnx"].stat().st_size
    assert files["onnx_fp16"].stat().st_size < 0.6 * full
    assert files["onnx_int8"].stat().st_size < 0.35 * full
    graph = onnx.load(str(files["onnx_int8"])).graph
    producer = {output: node.op_type for node in graph.node for output in node.output}
    convolutions = [node for node in graph.node if node.op_type == "Conv"]
    # static QDQ: every convolution reads int8-dequantized activations and weights; the classifier stays float
    assert convolutions and all(
        producer.get(name) == "DequantizeLinear" for node in convolutions for name in node.input[:2]
    )
    head = next(node for node in graph.node if node.name == classifier_node(graph))
    assert producer.get(head.input[1]) != "DequantizeLinear"


def test_onnx_files_record_the_preprocessing_and_take_any_batch(exported):
    import onnx
    import onnxruntime

    model, images, _, files, _ = exported
    expected = as_metadata(preprocessing(CONFIG))
    for variant in ("onnx", "onnx_fp16", "onnx_int8"):
        metadata = {prop.key: prop.value for prop in onnx.load(str(files[variant])).metadata_props}
        assert metadata == expected
    assert json.loads(expected["classes"]) == CONFIG.classes and expected["image_size"] == str(SIZE)
    assert json.loads(expected["mean"]) == [0.5] * 3 and json.loads(expected["std"]) == [0.5] * 3
    assert "do not normalise again" in expected["normalization"]
    session = onnxruntime.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == ["image"]
    for batch in (1, 5):
        assert session.run(["logits"], {"image": as_input(images[:batch])})[0].shape == (batch, 2)


def test_onnx_variants_output_the_embedding_the_abstain_rule_reads(exported):
    """fp32 and fp16 give PyTorch's embedding; int8 only its shape (its convolutions distort the embedding far
    more than the logits: the export stage measures how far its abstentions follow PyTorch's)."""
    import onnxruntime

    from stages.lib.model.abstention import with_embedding

    model, images, _, files, _ = exported
    with torch.inference_mode():
        expected = with_embedding(model)(torch.from_numpy(as_input(images)))[1].numpy()
    for variant in ("onnx", "onnx_fp16", "onnx_int8"):
        session = onnxruntime.InferenceSession(str(files[variant]), providers=["CPUExecutionProvider"])
        embedding = session.run(["embedding"], {"image": as_input(images)})[0]
        assert embedding.shape == expected.shape
        relative = np.linalg.norm(embedding - expected) / np.linalg.norm(expected)
        assert relative <= {"onnx": 1e-4, "onnx_fp16": 0.02, "onnx_int8": np.inf}[variant], variant


def test_torchscript_carries_the_preprocessing(exported):
    extra = {"preprocessing.json": ""}
    torch.jit.load(str(exported[3]["torchscript"]), _extra_files=extra)
    assert json.loads(extra["preprocessing.json"]) == preprocessing(CONFIG)


def test_export_stage_outputs(tiny_pipeline):
    import onnxruntime

    from stages.lib.inference.classifier import ImageClassifier

    # the DVC metrics file holds only deterministic headline figures (it is shared through the DVC remote)
    results = json.loads((tiny_pipeline / "metrics/export.json").read_text())
    variants = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())["export"]["variants"]
    assert results.keys() == set(variants) == {"onnx", "onnx_fp16", "onnx_int8"}  # torchscript only on request
    for variant in variants:
        assert (tiny_pipeline / "models/export" / FILES[variant]).is_file()
        assert results[variant].keys() == {"top1_agreement"}
    assert results["onnx"]["top1_agreement"] == 1.0
    # a real image prepared as the ONNX metadata says gets the fine-tuned model's answer
    image_file = sorted((tiny_pipeline / "data/images").glob("*/*.png"))[0]
    classifier = ImageClassifier.from_folder(tiny_pipeline / "models/finetuned")
    expected = classifier.predict([image_file.read_bytes()]).loc[0, "probabilities"]
    metadata = json.loads((tiny_pipeline / "models/export/preprocessing.json").read_text())
    size = metadata["image_size"]
    pixels = np.asarray(Image.open(image_file).convert("RGB").resize((size, size), Image.BICUBIC))
    session = onnxruntime.InferenceSession(str(tiny_pipeline / "models/export/model.onnx"))
    logits = session.run(["logits"], {"image": as_input(pixels[None])})[0][0]
    assert metadata["classes"][logits.argmax()] == classifier.classes[int(np.argmax(expected))]
    # the files are in the export stage's MLflow run
    runs = mlflow_runs(tiny_pipeline)
    run_id = runs.loc[runs["tags.stage"] == "export", "run_id"].item()
    from mlflow import MlflowClient

    logged = {item.path for item in MlflowClient().list_artifacts(run_id, "export")}
    assert {f"export/{FILES[variant]}" for variant in variants} <= logged
    # timings and sizes go to the MLflow run only, bounded in runs
    metrics = MlflowClient().get_run(run_id).data.metrics
    for variant in ("pytorch", *variants):
        assert metrics[f"{variant}.latency_ms_b1"] > 0 and metrics[f"{variant}.size_mb"] > 0
        assert 1 <= metrics[f"{variant}.latency_runs_b32"] <= 10
    assert metrics["onnx.max_abs_logit_diff"] < 1e-2
    assert metrics["onnx.abstain_agreement"] == 1.0  # the export folder's abstain rule (abstain.json) on test
    assert (tiny_pipeline / "models/export/abstain.json").is_file()
    # int8 has its own rule, fitted on its own embedding: it follows PyTorch's abstentions too
    own = json.loads((tiny_pipeline / "models/export/abstain_int8.json").read_text())
    assert (
        own["reference"] == "abstain_reference_int8.npz"
        and (tiny_pipeline / "models/export" / own["reference"]).is_file()
    )
    assert metrics["onnx_int8.abstain_agreement"] >= 0.8  # a float reference: ~0.04 on the demo


def test_latency_timing_is_bounded_in_runs_and_time():
    calls = []

    def fast(batch):
        calls.append(len(batch))
        return np.zeros((len(batch), 2), np.float32)

    images = np.zeros((5, SIZE, SIZE, 3), np.uint8)
    ms, runs = latency_ms(fast, images, batch=4, repeats=3, max_seconds=60.0, warmup=2)
    assert runs == 3 and len(calls) == 5 and set(calls) == {4} and ms >= 0  # 2 warm-up + 3 timed, batch of 4

    def slow(batch):
        time.sleep(0.02)
        return np.zeros((len(batch), 2), np.float32)

    assert latency_ms(slow, images, batch=1, repeats=100, max_seconds=0.001, warmup=0)[1] == 1  # the cap stops it
