"""Which out-of-distribution score tells a trained model's own images from images of another kind, and
what the abstain rule and the heatmaps cost.

    python benchmarks/abstain.py scores --project . --foreign letters=foreign/letters shapes=foreign/shapes \\
        [--out benchmarks/results/abstain_scores.csv]
    python benchmarks/abstain.py cost --project . [--out benchmarks/results/abstain_cost.csv]

Needs a project whose `finetune` stage has run (models/finetuned, data/prepared) and, for `scores`, folders
of foreign images (`python -m stages.demo_data --kind letters --out foreign/letters`; for a digits model,
`--kind shapes` too). `scores`: each score is computed from the fine-tuned model's own outputs (calibrated
logits, and the embedding its classifier receives); its threshold is chosen on val to keep 95 % (and 99 %) of
the val images, then applied to test (kept, %) and to each foreign set (abstained, %); AUROC of test against
each foreign set too. Scores compared: max softmax probability, energy (logsumexp of the logits),
Mahalanobis distance to the nearest class mean (shared Ledoit-Wolf covariance, scikit-learn), cleanlab's
`OutOfDistribution` (mean cosine distance to the 10 nearest training embeddings) and the k-th nearest
training embedding's cosine distance for k = 1, 10, 50. Mahalanobis is the rule's score (model/abstention.py).
`cost`: seconds per image at batch 1, one thread, of `ImageClassifier.predict` with and without the rule
and of the ONNX model with and without its post-processing (`core.timing.median_seconds`, the two sides
alternating), and the whole evaluate stage (its dvc.yaml command, in the project, which it rewrites) with and
without the Grad-CAM overlays (`evaluate.heatmaps`). Ratios are what to compare; run on an idle machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.lib.core.arrays import softmax  # noqa: E402
from stages.lib.core.params import load_params  # noqa: E402
from stages.lib.core.timing import median_seconds  # noqa: E402
from stages.lib.data.prepared import load_split  # noqa: E402
from stages.lib.inference.abstain_fit import spread  # noqa: E402
from stages.lib.inference.classifier import ImageClassifier, decode_image  # noqa: E402
from stages.lib.inference.predict import image_files  # noqa: E402
from stages.lib.model.abstention import Reference  # noqa: E402


def foreign_images(folder: Path, classifier: ImageClassifier) -> np.ndarray:
    return np.stack([decode_image(path.read_bytes(), classifier.data_config) for path in image_files([folder])])


def normalized(embeddings: np.ndarray) -> np.ndarray:
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def knn_distance(embeddings: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Cosine distance to the k-th nearest row of `reference` (unit rows)."""
    similarity = normalized(embeddings) @ reference.T
    return 1.0 - np.partition(similarity, -k, axis=1)[:, -k]


def cleanlab_knn(train: np.ndarray):
    from cleanlab.outlier import OutOfDistribution

    ood = OutOfDistribution()
    ood.fit(features=normalized(train))
    return lambda x: 1.0 - ood.score(features=normalized(x))


def scores(args) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    project = args.project
    classifier = ImageClassifier.from_folder(project / "models/finetuned")
    outputs = {}
    for split in ("train", "val", "test"):
        images, labels = load_split(project / "data/prepared", split)
        outputs[split] = (*classifier.outputs(images), labels)
    for spec in args.foreign:
        name, folder = spec.split("=", 1)
        outputs[name] = (*classifier.outputs(foreign_images(Path(folder), classifier)), None)
    train_logits, train_x, train_y = outputs["train"]
    keep = spread(len(train_x), 5000)
    reference = normalized(train_x[keep])
    methods = {
        "max_softmax": lambda logits, x: -softmax(logits).max(1),
        "energy": lambda logits, x: -np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) - logits.max(1),
    }
    reference_stats = Reference.fit(train_x[keep], train_y[keep])  # the rule's score (model/abstention.py)
    methods["mahalanobis"] = lambda logits, x: reference_stats.scores(x)
    cleanlab_score = cleanlab_knn(train_x[keep])
    methods["cleanlab_knn_mean_k10"] = lambda logits, x: cleanlab_score(x)
    for k in (1, 10, 50):
        methods[f"knn_cosine_k{k}"] = lambda logits, x, k=k: knn_distance(x, reference, k)
    rows = []
    for method, score in methods.items():
        values = {name: score(logits, x) for name, (logits, x, _) in outputs.items() if name != "train"}
        for keep in args.keep:
            threshold = np.quantile(values["val"], keep, method="higher")
            row = {
                "score": method,
                "val_kept_pct": round(100 * keep, 1),
                "test_kept_pct": round(100 * float((values["test"] <= threshold).mean()), 1),
            }
            for spec in args.foreign:
                name = spec.split("=", 1)[0]
                row[f"{name}_abstained_pct"] = round(100 * float((values[name] > threshold).mean()), 1)
                auroc = roc_auc_score(
                    np.r_[np.zeros(len(values["test"])), np.ones(len(values[name]))],
                    np.r_[values["test"], values[name]],
                )
                row[f"{name}_auroc"] = round(float(auroc), 4)
            rows.append(row)
            print(row)
    return rows


def alternating(first, second, rounds: int, seconds: float) -> tuple[float, float, float]:
    """(median seconds of `first`, of `second`, median of the per-round ratios second / first), measured in
    alternating rounds, so that load from elsewhere hits both sides alike."""
    a, b = [], []
    for _ in range(rounds):
        a.append(median_seconds(first, 5, seconds / rounds, warmup=1)[0])
        b.append(median_seconds(second, 5, seconds / rounds, warmup=1)[0])
    return float(np.median(a)), float(np.median(b)), float(np.median(np.array(b) / np.array(a)))


def evaluate_seconds(project: Path, heatmaps: int) -> float:
    """Wall seconds of the project's evaluate stage (its dvc.yaml command) with `evaluate.heatmaps` set."""
    import shutil
    import subprocess

    import yaml

    from stages.lib.core.timing import timed

    params = project / "params.yaml"
    saved = params.with_suffix(".yaml.saved")
    shutil.copy2(params, saved)
    try:
        values = yaml.safe_load(params.read_text())
        values.setdefault("evaluate", {})["heatmaps"] = heatmaps
        params.write_text(yaml.safe_dump(values, sort_keys=False))
        command = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["evaluate"]["cmd"]
        env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        seconds, result = timed(
            lambda: subprocess.run(command, shell=True, cwd=project, env=env, capture_output=True, text=True)
        )
        if result.returncode:
            raise SystemExit(f"evaluate failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return seconds
    finally:
        shutil.move(saved, params)


def cost(args) -> list[dict]:
    import torch

    from stages.lib.inference.abstain import read_export_rule, write_export_rule
    from stages.lib.inference.export import export_onnx, preprocessing
    from stages.lib.registry.pyfunc import encode_png

    torch.set_num_threads(1)
    project = args.project
    classifier = ImageClassifier.from_folder(project / "models/finetuned")
    images, labels = load_split(project / "data/prepared", "test")
    one = [encode_png(images[0])]
    rows = []
    bare, ruled, ratio = alternating(
        lambda: classifier.predict(one, abstain=False), lambda: classifier.predict(one), args.rounds, args.seconds
    )
    rows.append(
        {"path": "predict (torch), batch 1", "bare_ms": 1000 * bare, "with_rule_ms": 1000 * ruled, "ratio": ratio}
    )
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        export_onnx(classifier.model, folder / "model.onnx", classifier.size, 17, preprocessing(classifier.card))
        write_export_rule(folder, project / "models/finetuned", classifier.card)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        abstainer = read_export_rule(folder)
        batch = images[:1].astype(np.float32).transpose(0, 3, 1, 2) / 255.0

        def onnx_bare():
            return softmax(session.run(["logits"], {"image": batch})[0])

        def onnx_ruled():
            logits, embedding = session.run(["logits", "embedding"], {"image": batch})
            return abstainer.decide(softmax(logits), embedding)

        bare, ruled, ratio = alternating(onnx_bare, onnx_ruled, args.rounds, args.seconds)
    rows.append({"path": "ONNX, batch 1", "bare_ms": 1000 * bare, "with_rule_ms": 1000 * ruled, "ratio": ratio})
    count = load_params(project / "params.yaml", timm_names=False).evaluate.heatmaps or 8
    bare, heat = [], []
    for _ in range(args.evaluate_rounds):  # the whole evaluate stage, without and with the overlays, alternating
        bare.append(evaluate_seconds(project, 0))
        heat.append(evaluate_seconds(project, count))
    rows.append(
        {
            "path": f"the evaluate stage, with {count} + {count} Grad-CAM overlays",
            "bare_ms": 1000 * float(np.median(bare)),
            "with_rule_ms": 1000 * float(np.median(heat)),
            "ratio": float(np.median(np.array(heat) / np.array(bare))),
        }
    )
    for row in rows:
        row["ratio"] = round(row["ratio"], 3)
        row["bare_ms"], row["with_rule_ms"] = round(row["bare_ms"], 3), round(row["with_rule_ms"], 3)
        print(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("scores", "cost"))
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--foreign", nargs="*", default=[], help="name=folder of images of another kind")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.95, 0.99], help="scores: val shares kept")
    parser.add_argument("--rounds", type=int, default=21, help="cost: alternating rounds")
    parser.add_argument("--seconds", type=float, default=6.0, help="cost: timing budget per side")
    parser.add_argument("--evaluate-rounds", type=int, default=3, help="cost: evaluate runs per side")
    parser.add_argument("--source", default="", help="where and when it was measured (a column of every row)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = scores(args) if args.what == "scores" else cost(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) + ["source"])
            writer.writeheader()
            writer.writerows(row | {"source": args.source} for row in rows)


if __name__ == "__main__":
    main()
