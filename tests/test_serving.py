"""Inference on encoded images: decoding like the augment stage, per-row errors, the registered
pyfunc, and `mlflow models serve` answering REST requests for a real and a corrupt image."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BIN, pipeline_env
from stages.lib.backbones import create_backbone
from stages.lib.images import load_rgb, resample_filter
from stages.lib.serving import ImageClassifier, ImageDecodeError, decode_image

MODEL_NAME = "image-classifier"  # params.yaml: mlflow.registered_model


def png_bytes(pixels: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A model folder as finetune writes it (random weights: these tests are about the plumbing)."""
    folder = tmp_path_factory.mktemp("finetuned")
    torch.manual_seed(0)
    torch.save(create_backbone("tf_efficientnet_lite0", "none", 3).state_dict(), folder / "model.pt")
    (folder / "config.json").write_text(json.dumps({
        "model": "tf_efficientnet_lite0", "num_classes": 3, "classes": ["cat", "dog", "fox"],
        "data_config": {"input_size": [3, 32, 32], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}}))
    return folder


def test_decoding_matches_the_augment_stage(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    (tmp_path / "image.png").write_bytes(png_bytes(pixels))
    expected = load_rgb(tmp_path / "image.png", 32, resample_filter("bicubic"))
    assert np.array_equal(decode_image(png_bytes(pixels), 32, "bicubic"), expected)


@pytest.mark.parametrize("data, message", [
    (b"", "empty input"),
    (b"GIF89a not really", "not an image"),
    (png_bytes(np.zeros((64, 64, 3), dtype=np.uint8))[:60], "corrupt image"),
])
def test_undecodable_input_is_named(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, 32)


def test_bad_images_get_an_error_row_and_do_not_stop_the_batch(model_folder):
    classifier = ImageClassifier.from_folder(model_folder)
    image = png_bytes(np.full((50, 50, 3), 200, dtype=np.uint8))
    rows = classifier.predict([image, b"not an image", base64.b64encode(image).decode(), 42])
    assert list(rows.columns) == ["label", "probability", "probabilities", "error"]
    assert list(rows["error"]) == ["", "not an image (unrecognised format)", "",
                                   "expected encoded image bytes, got int"]
    assert rows.loc[0, "label"] in {"cat", "dog", "fox"}
    assert sum(rows.loc[0, "probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert rows.loc[0, "probability"] == pytest.approx(max(rows.loc[0, "probabilities"]))
    assert rows.loc[2, "probabilities"] == rows.loc[0, "probabilities"]  # base64 text is the same image
    assert rows.loc[1, "label"] is None and rows.loc[1, "probabilities"] is None


def test_missing_model_files_are_reported(tmp_path):
    with pytest.raises(Exception, match="no model.pt"):
        ImageClassifier.from_folder(tmp_path)


# ------------------------------------------------------------------------- the registered model
def test_registered_version_is_an_image_pyfunc(tiny_pipeline):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tiny_pipeline / 'mlflow.db'}")
    info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}@champion")
    assert [(column.name, column.type.name) for column in info.signature.inputs] == [("image", "binary")]
    assert {column.name for column in info.signature.outputs} == {"label", "probability", "probabilities", "error"}
    classes = json.loads((tiny_pipeline / "models/finetuned/config.json").read_text())["classes"]
    assert info.metadata["classes"] == classes
    # the evaluation is visible on the version and on the logged model
    version = mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion")
    accuracy = json.loads((tiny_pipeline / "metrics/evaluate.json").read_text())["finetuned"]["accuracy"]
    assert version.description.startswith(f"Test split: accuracy {accuracy:.4f}")
    logged = {metric.key: metric.value for metric in mlflow.get_logged_model(info.model_id).metrics}
    assert logged["test_accuracy"] == pytest.approx(accuracy)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    image = sorted((tiny_pipeline / "data/images").glob("*/*.png"))[0].read_bytes()
    import pandas as pd

    rows = model.predict(pd.DataFrame({"image": [image, b"\x89PNG broken"]}))
    local = ImageClassifier.from_folder(tiny_pipeline / "models/finetuned").predict([image])
    assert rows.loc[0, "label"] == local.loc[0, "label"]
    assert rows.loc[0, "probability"] == pytest.approx(local.loc[0, "probability"], abs=1e-5)
    assert rows.loc[1, "error"].startswith(("not an image", "corrupt image"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, values: list[bytes] | None = None, body: dict | None = None) -> tuple[int, dict]:
    if body is None:
        data = [[base64.b64encode(value).decode()] for value in values]
        body = {"dataframe_split": {"columns": ["image"], "data": data}}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture
def server(tiny_pipeline, tmp_path):
    """`mlflow models serve` of the champion on a free loopback port; always stopped afterwards."""
    port = free_port()
    env = pipeline_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{tiny_pipeline / 'mlflow.db'}"}
    log_file = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited ({process.returncode}):\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"no answer on port {port} in 240 s:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
                time.sleep(1)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log_file.close()


def test_rest_serving_of_a_real_and_a_corrupt_image(tiny_pipeline, server):
    image_file = sorted((tiny_pipeline / "data/images").glob("*/*.png"))[0]
    image = image_file.read_bytes()
    expected = ImageClassifier.from_folder(tiny_pipeline / "models/finetuned").predict([image]).loc[0]

    status, answer = post(server, [image])
    assert status == 200
    [row] = answer["predictions"]
    assert row["error"] == "" and row["label"] == expected["label"]
    assert row["probability"] == pytest.approx(expected["probability"], abs=1e-5)

    corrupt = image[: len(image) // 2]  # a truncated PNG
    status, answer = post(server, [corrupt, b"plain text, not an image", image])
    assert status == 200
    first, second, third = answer["predictions"]
    assert first["error"].startswith("corrupt image") and first["label"] is None and first["probability"] is None
    assert second["error"] == "not an image (unrecognised format)"
    assert third["label"] == expected["label"]

    status, answer = post(server, body={"dataframe_split": {"columns": ["picture"], "data": [["x"]]}})
    assert status == 400 and "image" in json.dumps(answer)

    status, answer = post(server, [image])  # still serving
    assert status == 200 and answer["predictions"][0]["label"] == expected["label"]
