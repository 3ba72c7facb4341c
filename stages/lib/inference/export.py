"""Deployable files of the fine-tuned model, and how far each one may be trusted.

Every variant takes what `NormalizedClassifier` takes (float32 RGB in [0, 1], NCHW, the model's
input size; normalisation is inside the graph) and returns logits:
- `onnx`: the legacy TorchScript-based exporter (`dynamo=False`: the dynamo exporter needs
  onnxscript), dynamic batch axis; the preprocessing (size, interpolation, mean, std, classes)
  is recorded in the model's metadata_props; a second output `embedding` feeds the abstain rule
  that ships beside it (`abstain.json`, inference/abstain.py).
- `onnx_fp16`: weights and compute in float16, float32 inputs/outputs
  (onnxruntime.transformers.float16).
- `onnx_int8`: static int8 quantization of the convolutions (onnxruntime.quantization.quantize_static,
  QDQ, weights per channel), activation ranges calibrated on training images: several times smaller
  than float32; whether it is also faster depends on the CPU's int8 kernels.
- `torchscript`: `torch.jit.trace` (deprecated by PyTorch; not a default), with the same preprocessing JSON
  as an extra file.
`export_and_check` writes the requested variants (and preprocessing.json) into a fresh folder and compares
each one's logits on the test split with PyTorch's (`parity`); `time_variants` times each on the CPU.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from stages.lib.core.arrays import batched
from stages.lib.core.params import Export
from stages.lib.core.timing import median_seconds
from stages.lib.data.pixels import to_float_array
from stages.lib.inference.classifier import ImageClassifier
from stages.lib.model.abstention import with_embedding
from stages.lib.model.card import FinetunedCard

FILES = {
    "onnx": "model.onnx",
    "onnx_fp16": "model_fp16.onnx",
    "onnx_int8": "model_int8.onnx",
    "torchscript": "model_torchscript.pt",
}
Runner = Callable[[np.ndarray], np.ndarray]  # float32 NCHW in [0, 1] -> logits


def preprocessing(card: FinetunedCard) -> dict:
    """What a caller must do before the model and how to read its output, from finetune's model card."""
    data = card.data_config
    size = data["input_size"][-1]
    return {
        "model": card.model,
        "classes": card.classes,
        "image_size": size,
        "interpolation": data["interpolation"],
        "mean": data["mean"],
        "std": data["std"],
        "input": f"float32 NCHW RGB in [0, 1], {size}x{size}: decode upright (EXIF), convert to RGB, resize the "
        f"shorter side to {size} ({data['interpolation']}), centre-crop, divide by 255",
        "normalization": "inside the model: (x - mean) / std; do not normalise again",
        "output": "logits, one per class in `classes` order (softmax for probabilities)",
    }


def as_metadata(values: dict) -> dict[str, str]:
    """ONNX metadata_props and TorchScript extra files hold strings: lists and numbers as JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}


@contextmanager
def _working_directory(folder: str):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def _quiet():
    """Silence the exporters' deprecation notices and onnxruntime's root-logger chatter."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX|torch.jit|deprecated).*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            yield
    finally:
        root.setLevel(level)


def export_onnx(model: torch.nn.Module, path: Path, size: int, opset: int, metadata: dict) -> None:
    """ONNX with a dynamic batch axis, input `image`, outputs `logits` and `embedding` (what the classifier
    receives: the abstain rule's input, inference/abstain.py), `metadata` recorded (`as_metadata`), checked."""
    import onnx

    example = torch.rand(2, 3, size, size)
    with _quiet(), torch.inference_mode():
        torch.onnx.export(
            with_embedding(model).eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits", "embedding"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}},
        )
    exported = onnx.load(str(path))
    onnx.helper.set_model_props(exported, as_metadata(metadata))
    onnx.checker.check_model(exported)
    onnx.save(exported, str(path))


def to_fp16(source: Path, path: Path, metadata: dict) -> None:
    """float16 weights and compute; inputs and outputs stay float32; `metadata` as model.onnx's."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    original = onnx.load(str(source))
    with _quiet():
        converted = convert_float_to_float16(original, keep_io_types=True)
    onnx.helper.set_model_props(converted, as_metadata(metadata))
    onnx.save(converted, str(path))


def classifier_node(graph) -> str:
    """The name of the classifier's Gemm/MatMul: walking back from the `logits` output over element-wise
    nodes (the temperature's Div) to the first matrix product."""
    producer = {output: node for node in graph.node for output in node.output}
    node = producer["logits"]
    while node.op_type not in ("Gemm", "MatMul"):
        node = producer[node.input[0]]
    return node.name


class _Calibration:
    """onnxruntime's CalibrationDataReader over uint8 NHWC images, `batch_size` at a time."""

    def __init__(self, images: np.ndarray, batch_size: int):
        self.batches = iter(
            [
                {"image": to_float_array(images[start : start + batch_size])}
                for start in range(0, len(images), batch_size)
            ]
        )

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def to_int8(source: Path, path: Path, metadata: dict, calibration: np.ndarray, batch_size: int = 32) -> None:
    """Static quantization of the convolutions: int8 weights (one scale per output channel) and int8
    activations whose ranges are calibrated on `calibration` (uint8 NHWC images of the training split,
    never test), in QDQ form, after onnxruntime's recommended pre-processing (shape inference and graph
    optimisation); `metadata` as model.onnx's.

    The classifier (the node writing `logits`) stays float32 in any case: it is a tiny share of the
    weights, and a head started from a linear probe can hold a few very large weights next to many
    small ones, which int8 rounds to zero (every image then gets the same logits)."""
    import onnx
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, path = source.resolve(), path.resolve()
    prepared = path.with_suffix(".pre.onnx")
    # onnxruntime writes scratch models (and a debug model when its symbolic pass fails) into the working
    # directory: a temporary one keeps them out of the repository
    with _quiet(), tempfile.TemporaryDirectory(prefix="int8-") as scratch, _working_directory(scratch):
        try:
            quant_pre_process(str(source), str(prepared))
        except Exception as error:  # noqa: BLE001 (onnxruntime raises a bare Exception)
            if "symbolic shape inference" not in str(error):
                raise
            # timm's forward_intermediates (a fused model) defeats the symbolic pass;
            # ONNX's own shape inference suffices
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        head = [classifier_node(onnx.load(str(prepared)).graph)]
        # convolutions only: the pad arithmetic of timm's "SAME" padding (tf_* models) must stay exact;
        # the quantizer renames a Gemm it splits into MatMul + Add: exclude both names
        quantize_static(
            str(prepared),
            str(path),
            _Calibration(calibration, batch_size),
            per_channel=True,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=head + [f"{name}_MatMul" for name in head],
        )
    prepared.unlink()
    quantized = onnx.load(str(path))
    onnx.helper.set_model_props(quantized, as_metadata(metadata))
    onnx.save(quantized, str(path))


def export_torchscript(model: torch.nn.Module, path: Path, size: int, metadata: dict) -> None:
    with _quiet(), torch.inference_mode():
        # no check_trace (a second traced copy run against the first): parity with PyTorch is checked on the test split
        traced = torch.jit.trace(model.eval(), torch.rand(1, 3, size, size), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"preprocessing.json": json.dumps(metadata, indent=2)})


def export_all(
    variants: list[str],
    model: torch.nn.Module,
    folder: Path,
    size: int,
    opset: int,
    metadata: dict,
    calibration: np.ndarray,
) -> dict[str, Path]:
    """Write the requested variants into folder; return {variant: file}. The fp16 and int8 files
    start from model.onnx, which is kept only when `onnx` itself is requested; `calibration` (uint8 NHWC
    training images) calibrates the int8 activations."""
    onnx_path = folder / FILES["onnx"]
    if any(variant.startswith("onnx") for variant in variants):
        export_onnx(model, onnx_path, size, opset, metadata)
    convert = {
        "onnx": lambda path: None,
        "onnx_fp16": lambda path: to_fp16(onnx_path, path, metadata),
        "onnx_int8": lambda path: to_int8(onnx_path, path, metadata, calibration),
        "torchscript": lambda path: export_torchscript(model, path, size, metadata),
    }
    paths = {}
    for variant in variants:
        paths[variant] = folder / FILES[variant]
        convert[variant](paths[variant])
    if "onnx" not in variants:
        onnx_path.unlink(missing_ok=True)
    return paths


def runner(variant: str, path: Path, threads: int) -> Runner:
    """A function running the exported file on the CPU with `threads` threads."""
    if variant == "torchscript":
        with _quiet():
            module = torch.jit.load(str(path)).eval()

        def run_torchscript(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(batch)).numpy()

        return run_torchscript
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(["logits"], {"image": batch})[0].astype(np.float32)


def pytorch_runner(model: torch.nn.Module) -> Runner:
    def run_pytorch(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return run_pytorch


def logits_of(run: Runner, images: np.ndarray, batch_size: int) -> np.ndarray:
    return batched(lambda batch: run(to_float_array(batch)), images, batch_size)


def parity(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How a variant's logits compare with PyTorch's on the same images."""
    accuracy = float((logits.argmax(1) == labels).mean())
    return {
        "max_abs_logit_diff": float(np.abs(logits - reference).max()),
        "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "accuracy": accuracy,
        "accuracy_delta": accuracy - float((reference.argmax(1) == labels).mean()),
    }


def latency_ms(
    run: Runner, images: np.ndarray, batch: int, repeats: int, max_seconds: float, warmup: int = 2
) -> tuple[float, int]:
    """(median wall time per image in ms, timed runs) on a batch of `batch` test images.

    After `warmup` untimed runs at this batch size (allocations; TorchScript specialises its graph on
    its first two runs, so fewer would time the compiler), times at most `repeats` runs and stops
    early once `max_seconds` have been spent timing (at least one run counts)."""
    inputs = to_float_array(images[np.resize(np.arange(len(images)), batch)])
    seconds, runs = median_seconds(lambda: run(inputs), repeats, max_seconds, warmup)
    return 1000.0 * seconds / batch, runs


def size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def state_dict_mb(model: torch.nn.Module) -> float:
    """Size of the model's weights as torch.save writes them (the PyTorch reference)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def calibration_sample(train: np.ndarray, count: int) -> np.ndarray:
    """`count` training images spread evenly over the split: the int8 variant's calibration set."""
    return train[np.linspace(0, len(train) - 1, min(count, len(train))).astype(int)]


def export_and_check(
    folder: Path,
    classifier: ImageClassifier,
    settings: Export,
    test: tuple[np.ndarray, np.ndarray],
    train: np.ndarray,
    threads: int,
) -> tuple[dict[str, dict[str, float]], dict[str, Path]]:
    """Write `settings.variants` and preprocessing.json into a fresh folder, then run each variant on the test
    split (images, labels) with `threads` threads against the PyTorch model. Returns (per variant, and
    `pytorch` first: accuracy, size and the `parity` figures; per variant: its file)."""
    model, images, labels = classifier.model, *test
    metadata = preprocessing(classifier.card)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "preprocessing.json").write_text(json.dumps(metadata, indent=2) + "\n")
    reference = logits_of(pytorch_runner(model), images, settings.batch_size)
    results = {
        "pytorch": {
            "accuracy": float((reference.argmax(1) == labels).mean()),
            "size_mb": round(state_dict_mb(model), 3),
        }
    }
    calibration = calibration_sample(train, settings.calibration_images)
    files = export_all(settings.variants, model, folder, classifier.size, settings.opset, metadata, calibration)
    for variant, path in files.items():
        logits = logits_of(runner(variant, path, threads), images, settings.batch_size)
        results[variant] = parity(reference, logits, labels) | {"size_mb": round(size_mb(path), 3)}
    return results, files


def time_variants(model: torch.nn.Module, files: dict[str, Path], images: np.ndarray, settings: Export) -> dict:
    """CPU latency per image of PyTorch and each exported file at `settings.latency_batches`, with
    `settings.threads` threads: {variant: {latency_ms_b<batch>, latency_runs_b<batch>}}."""
    torch.set_num_threads(settings.threads)
    timed = {"pytorch": pytorch_runner(model)} | {
        variant: runner(variant, path, settings.threads) for variant, path in files.items()
    }
    results = {}
    for variant, run in timed.items():
        results[variant] = {}
        for batch in settings.latency_batches:
            ms, runs = latency_ms(
                run, images, batch, settings.latency_repeats, settings.latency_seconds, settings.latency_warmup
            )
            results[variant] |= {f"latency_ms_b{batch}": round(ms, 4), f"latency_runs_b{batch}": runs}
    return results
