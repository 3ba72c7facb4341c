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
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, REPO, pipeline_env, run
from PIL import Image

from stages.lib.core.errors import PipelineError
from stages.lib.data.preprocessing import DataConfig, decode
from stages.lib.inference.classifier import ImageClassifier, ImageDecodeError, decode_image
from stages.lib.model.backbones import create_backbone

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
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model": "tf_efficientnet_lite0",
                "num_classes": 3,
                "classes": ["cat", "dog", "fox"],
                "data_config": {
                    "input_size": [3, 32, 32],
                    "interpolation": "bicubic",
                    "mean": [0.5] * 3,
                    "std": [0.5] * 3,
                },
            }
        )
    )
    return folder


CONTRACT = DataConfig(32, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_decoding_matches_the_augment_stage(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    (tmp_path / "image.png").write_bytes(png_bytes(pixels))
    expected = decode(tmp_path / "image.png", 32, "bilinear")
    assert np.array_equal(decode_image(png_bytes(pixels), CONTRACT), expected)
    assert not np.array_equal(expected, decode(tmp_path / "image.png", 32, "bicubic"))


def test_an_unknown_filter_is_an_error_not_a_silent_default():
    with pytest.raises(PipelineError, match="unknown interpolation 'bicubicc'"):
        DataConfig(32, "bicubicc", (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty input"),
        (b"GIF89a not really", "not an image"),
        (png_bytes(np.zeros((64, 64, 3), dtype=np.uint8))[:60], "corrupt image"),
    ],
)
def test_undecodable_input_is_named(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, CONTRACT)


def test_bad_images_get_an_error_row_and_do_not_stop_the_batch(model_folder):
    classifier = ImageClassifier.from_folder(model_folder)
    image = png_bytes(np.full((50, 50, 3), 200, dtype=np.uint8))
    rows = classifier.predict([image, b"not an image", base64.b64encode(image).decode(), 42])
    assert list(rows.columns) == ["label", "probability", "probabilities", "error", "ood_score", "abstained", "reason"]
    assert list(rows["error"]) == [
        "",
        "not an image (unrecognised format)",
        "",
        "expected encoded image bytes, got int",
    ]
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
    assert {column.name for column in info.signature.outputs} == {
        *("label", "probability", "probabilities", "error"),
        *("ood_score", "abstained", "reason"),  # the abstain rule (docs/unknown.md)
    }
    assert [param.name for param in info.signature.params] == ["abstain"]
    classes = json.loads((tiny_pipeline / "models/finetuned/config.json").read_text())["classes"]
    assert info.metadata["classes"] == classes
    # the evaluation is visible on the version and on the logged model
    version = mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, "champion")
    results = json.loads((tiny_pipeline / "metrics/evaluate.json").read_text())["finetuned"]
    assert version.description.startswith(f"Val accuracy {results['val']['accuracy']:.4f} (what promotion compares)")
    assert float(version.tags["test.accuracy"]) == pytest.approx(
        results["test"]["accuracy"], abs=1e-6
    )  # tags hold 6 decimals
    logged = {metric.key: metric.value for metric in mlflow.get_logged_model(info.model_id).metrics}
    assert logged["test.accuracy"] == pytest.approx(results["test"]["accuracy"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    image = sorted((tiny_pipeline / "data/images").glob("*/*.png"))[0].read_bytes()
    import pandas as pd

    rows = model.predict(pd.DataFrame({"image": [image, b"\x89PNG broken"]}))
    local = ImageClassifier.from_folder(tiny_pipeline / "models/finetuned").predict([image])
    assert rows.loc[0, "label"] == local.loc[0, "label"]
    assert rows.loc[0, "probability"] == pytest.approx(local.loc[0, "probability"], abs=1e-5)
    assert rows.loc[1, "error"].startswith(("not an image", "corrupt image"))


OLD_ENTRY_POINT = """
import sys
import mlflow
import numpy as np
from stages.lib.registry import pyfunc

pyfunc.MODEL_CODE = pyfunc.MODEL_CODE.replace("from stages.lib.registry.pyfunc import", f"from {sys.argv[3]} import")
assert f"from {sys.argv[3]} import ImageClassifierModel" in pyfunc.MODEL_CODE
mlflow.set_tracking_uri(sys.argv[1])
with mlflow.start_run():
    pyfunc.log_image_classifier(sys.argv[2], np.zeros((32, 32, 3), np.uint8), "before-the-move")
"""


@pytest.mark.parametrize("old_module", ["stages.lib.serving", "stages.lib.pyfunc"])
def test_a_version_registered_with_an_old_import_path_still_predicts(model_folder, tmp_path, old_module):
    """Versions registered before the library's packages existed import their pyfunc from `stages.lib.serving`
    or `stages.lib.pyfunc`; `stages.predict --model models:/...` loads them in a process where this project's
    package is imported, so those two modules stay as re-exports."""
    run(
        tmp_path,
        sys.executable,
        "-c",
        OLD_ENTRY_POINT,
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        str(model_folder),
        old_module,
    )
    (tmp_path / "in.png").write_bytes(png_bytes(np.full((40, 40, 3), 90, np.uint8)))
    run(
        tmp_path,
        sys.executable,
        "-m",
        "stages.predict",
        "in.png",
        "--model",
        "models:/before-the-move/1",
        "--out",
        "out.csv",
    )
    import pandas as pd

    [row] = pd.read_csv(tmp_path / "out.csv", keep_default_na=False).to_dict("records")
    assert row["error"] == "" and row["pred_1"] in ("cat", "dog", "fox")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, values: list[bytes] | None = None, body: dict | None = None) -> tuple[int, dict]:
    if body is None:
        data = [[base64.b64encode(value).decode()] for value in values]
        body = {"dataframe_split": {"columns": ["image"], "data": data}}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def server(tiny_pipeline, tmp_path_factory):
    """`mlflow models serve` of the champion on a free loopback port; always stopped afterwards."""
    tmp_path = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = pipeline_env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{tiny_pipeline / 'mlflow.db'}"}
    log_file = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{MODEL_NAME}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                log = (tmp_path / "serve.log").read_text()[-3000:]
                pytest.fail(f"mlflow models serve exited ({process.returncode}):\n{log}")
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


def test_every_consumer_agrees_with_evaluate_on_encoded_files(tiny_pipeline, server):
    """The preprocessing contract, end to end, with a non-default resize filter (the tiny pipeline trains on
    bilinear images): the test split's encoded files sent through predict (model folder and registered model),
    the REST server and the ONNX model get the top-1 that evaluate reported for the same images."""
    import onnxruntime
    import pandas as pd

    from stages.lib.data.images import read_labelled_csv
    from stages.lib.data.preprocessing import decode

    assert (
        json.loads((tiny_pipeline / "models/finetuned/config.json").read_text())["data_config"]["interpolation"]
        == "bilinear"
    )
    evaluated = pd.read_csv(tiny_pipeline / "reports/evaluate/predictions.csv", dtype=str)
    evaluated = evaluated[(evaluated["split"] == "test") & (evaluated["model"] == "finetuned")].set_index("path")
    paths = read_labelled_csv(tiny_pipeline / "data/splits/test.csv")["path"].tolist()
    expected = [evaluated.loc[path, "predicted"] for path in paths]

    for model in ("models/finetuned", f"models:/{MODEL_NAME}@champion"):
        result = run(
            tiny_pipeline,
            str(BIN / "python"),
            "-m",
            "stages.predict",
            *paths,
            "--model",
            model,
            "--out",
            "-",
            "--top-k",
            "1",
        )
        table = pd.read_csv(io.StringIO(result.stdout), dtype=str).set_index("path")
        assert [table.loc[path, "pred_1"] for path in paths] == expected, model

    status, answer = post(server, [(tiny_pipeline / path).read_bytes() for path in paths])
    assert status == 200 and [row["label"] for row in answer["predictions"]] == expected

    session = onnxruntime.InferenceSession(str(tiny_pipeline / "models/export/model.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    size, interpolation, classes = int(meta["image_size"]), meta["interpolation"], json.loads(meta["classes"])
    batch = np.stack([decode(tiny_pipeline / path, size, interpolation) for path in paths])
    logits = session.run(None, {session.get_inputs()[0].name: batch.transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]
    assert [classes[i] for i in logits.argmax(1)] == expected


def test_serving_predict_and_onnx_agree_on_abstained(tiny_pipeline, server, tmp_path):
    """Test digits and images of other kinds (letters, shapes) through predict, the REST server and the ONNX
    export folder's documented post-processing (`abstain.json`): the same `abstained` and `reason` for each;
    `--no-abstain` and the REST param `abstain: false` give the bare answer."""
    import onnxruntime
    import pandas as pd

    from stages.lib.core.arrays import softmax
    from stages.lib.data.images import read_labelled_csv
    from stages.lib.inference.abstain import read_export_rule

    for kind in ("letters", "shapes"):
        out = str(tmp_path / kind)
        run(REPO, sys.executable, "-m", "stages.demo_data", "--kind", kind, "--out", out, "--per-class", "1")
    digits = [tiny_pipeline / path for path in read_labelled_csv(tiny_pipeline / "data/splits/test.csv")["path"]]
    files = digits + sorted(tmp_path.glob("letters/*/*.png"))[:10] + sorted(tmp_path.glob("shapes/*/*.png"))
    arguments = [str(BIN / "python"), "-m", "stages.predict", *map(str, files), "--out", "-", "--top-k", "1"]
    table = pd.read_csv(io.StringIO(run(tiny_pipeline, *arguments).stdout), keep_default_na=False)
    unknown = table["reason"] == "unknown input"
    assert unknown.any() and not unknown.all()  # the foreign images, and not the digits

    status, answer = post(server, [path.read_bytes() for path in files])
    assert status == 200
    served = pd.DataFrame(answer["predictions"])
    assert served["abstained"].tolist() == table["abstained"].tolist()
    assert served["reason"].tolist() == table["reason"].tolist()

    export = tiny_pipeline / "models/export"
    meta = json.loads((export / "preprocessing.json").read_text())
    batch = np.stack([decode(path, meta["image_size"], meta["interpolation"]) for path in files])
    session = onnxruntime.InferenceSession(str(export / "model.onnx"))
    logits, embedding = session.run(["logits", "embedding"], {"image": batch.transpose(0, 3, 1, 2) / np.float32(255)})
    decisions = read_export_rule(export).decide(softmax(logits), embedding)
    assert decisions.abstained.tolist() == table["abstained"].tolist() and decisions.reason == table["reason"].tolist()

    bare = pd.read_csv(io.StringIO(run(tiny_pipeline, *arguments, "--no-abstain").stdout), keep_default_na=False)
    assert not bare["abstained"].any() and bare["pred_1"].tolist() == table["pred_1"].tolist()
    data = [[base64.b64encode(path.read_bytes()).decode()] for path in files]
    status, answer = post(
        server, body={"dataframe_split": {"columns": ["image"], "data": data}, "params": {"abstain": False}}
    )
    assert status == 200 and not any(row["abstained"] for row in answer["predictions"])
