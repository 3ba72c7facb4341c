"""Frozen-backbone embeddings, their cache per candidate, and the linear probe.

Embeddings: the backbone's pooled pre-logits features (`forward_head(pre_logits=True)`, the input
of its classifier). With fusion (`fusion_stages` K > 0) they are concatenated with the
global-average-pooled outputs of the backbone's last K feature stages (timm's
`forward_intermediates`): dimension `num_features` + the channels of those K stages.

Cache: one .npz per candidate (arrays train_x/train_y/val_x/val_y/test_x/test_y) under
`<cache>/<prepared data digest>/`, named by a digest of everything the embeddings depend on
(`cache_key`), so adding a candidate or switching fusion back and forth extracts nothing twice.
The cache is not a DVC out (DVC would delete it before each run, and a `persist: true` out takes
the stage out of DVC's run cache): it is a plain folder under the real repository root, shared by
`dvc exp run --temp/--queue` copies. The stage copies the current candidates' files into its out
(data/features/<candidate>.npz), which DVC tracks. Only the `KEEP_DATA_VERSIONS` most recently
used prepared-data versions are kept.

The probe is scikit-learn's logistic regression on standardised embeddings, its regularisation
tuned on val. The scaler is folded into the weights, so the probe is exactly a linear layer on raw
embeddings. Without fusion it is also the starting head for fine-tuning (LP-FT); with fusion the
classifier sees only the pre-logits part of the embedding (its first columns), so LP-FT starts from
a second probe fit on those columns (`classifier_probe`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.lib.core.digest import file_sha256, folder_sha256, json_sha256
from stages.lib.data.prepared import load_split
from stages.lib.model.backbones import Normalize
from stages.lib.model.baseline import LinearHead
from stages.lib.model.fusion import check_fusion, pooled_sources

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
CACHE_VERSION = 2  # bump when the extraction code changes what it computes
BUILTIN_WEIGHTS = ("pypi", "imagenet", "none")
KEEP_DATA_VERSIONS = 3


# ------------------------------------------------------------------------------ extraction
@torch.inference_mode()
def extract_embeddings(
    model: nn.Module,
    images: np.ndarray,
    mean,
    std,
    batch_size: int,
    fusion_stages: int = 0,
    device: torch.device | None = None,
) -> np.ndarray:
    """Embeddings of uint8 NHWC images: float32 (N, D), in batches, channels_last, bf16 autocast on CUDA."""
    device = device or torch.device("cpu")
    check_fusion(model, fusion_stages)
    model = model.eval().to(device, memory_format=torch.channels_last)
    normalize = Normalize(mean, std).to(device)
    chunks = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in tqdm(range(0, len(images), batch_size), desc="embed", unit="batch", mininterval=2):
            batch = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2)
            batch = normalize(batch.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
            chunks.append(pooled_sources(model, batch, fusion_stages).float().cpu().numpy())
    return np.concatenate(chunks)


def embed_splits(
    model: nn.Module,
    prepared: Path,
    config: dict,
    batch_size: int,
    fusion_stages: int,
    device: torch.device | None = None,
) -> dict[str, np.ndarray]:
    """{split}_x embeddings and {split}_y labels for train, val and test of the prepared cache."""
    arrays = {}
    for split in SPLITS:
        images, arrays[f"{split}_y"] = load_split(prepared, split)
        arrays[f"{split}_x"] = extract_embeddings(
            model, images, config["mean"], config["std"], batch_size, fusion_stages, device
        )
    return arrays


# ----------------------------------------------------------------------------------- cache
def prepared_digest(prepared: Path) -> str:
    """The prepared cache's files (names and contents)."""
    return folder_sha256(prepared)


def cache_key(
    name: str, weights: str, image_size: int, fusion_stages: int, data_digest: str, seed: int, precision: str
) -> dict:
    """Everything a candidate's embeddings depend on. A weights file counts by its content;
    random weights (`none`) by the seed."""
    import timm

    key = {
        "version": CACHE_VERSION,
        "model": name,
        "weights": weights,
        "image_size": image_size,
        "fusion_stages": fusion_stages,
        "data": data_digest,
        "precision": precision,
        "timm": timm.__version__,
    }
    if weights == "none":
        key["seed"] = seed
    elif weights not in BUILTIN_WEIGHTS and Path(weights).is_file():
        key["weights_sha256"] = file_sha256(weights)
    return key


def file_stem(name: str) -> str:
    """A timm name as a file name (`hf-hub:org/model` has a slash)."""
    return re.sub(r"[^\w.-]", "_", name)


def cache_file(cache: Path, key: dict) -> Path:
    """<cache>/<data digest>/<model>-<weights>-<size>px-fusion<K>-<digest of the key>.npz."""
    digest = json_sha256(key)[:12]
    source = key["weights"] if key["weights"] in BUILTIN_WEIGHTS else "file"
    name = f"{file_stem(key['model'])}-{source}-{key['image_size']}px-fusion{key['fusion_stages']}-{digest}.npz"
    return data_folder(cache, key["data"]) / name


def data_folder(cache: Path, data_digest: str) -> Path:
    """The cache's folder for one version of the prepared data."""
    return Path(cache) / data_digest[:16]


def load_cached(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError, KeyError) as error:
        log.warning("ignoring unreadable cached embeddings %s: %s", path, error)
        return None


def save_cached(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically, so a killed run never leaves a half file that looks cached."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(partial, path)


def prune_cache(cache: Path, data_digest: str, keep: int = KEEP_DATA_VERSIONS) -> list[Path]:
    """Mark the current data version's folder as just used; delete all but the `keep` most recent."""
    current = data_folder(cache, data_digest)
    if current.is_dir():
        os.utime(current)
    folders = sorted(
        (path for path in Path(cache).iterdir() if path.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
    )
    removed = [folder for folder in folders[keep:] if folder != current]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


# ----------------------------------------------------------------------------------- probe
@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe: its regularisation C chosen on val, the head (standardisation folded in), its val
    scores, and every C tried (`grid`: C, val_accuracy, val_log_loss)."""

    C: float
    head: LinearHead
    val_accuracy: float
    val_log_loss: float
    grid: list[dict]


def standardiser(train_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per feature, the scale floored at a tenth of the median feature's.

    Pooled CNN features include near-constant channels (ReLU6 units that never fire on small
    images); dividing by their tiny spread gives the probe weights in the thousands, which
    wrecks fine-tuning from that head (LP-FT) and int8 export. The floor keeps weights O(1).
    """
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    return scaler.mean_, np.maximum(scaler.scale_, 0.1 * np.median(scaler.scale_))


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    c_grid: list[float],
    max_iter: int,
    seed: int,
) -> ProbeFit:
    """Logistic regression for each C; keep the best val accuracy (ties: lower val log loss), with the
    standardisation folded into the head's weight and bias.

    The fits and their val scores use one BLAS thread, whatever the stage's thread budget: at this
    size (about a thousand rows, a few thousand columns) more OpenBLAS threads slow the fits down, and
    with one thread the probe's floats do not depend on the machine's core count.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from threadpoolctl import threadpool_limits

    mean, scale = standardiser(train_x)
    train_s, val_s = (train_x - mean) / scale, (val_x - mean) / scale
    labels = np.arange(int(max(train_y.max(), val_y.max())) + 1)
    best, grid = None, []
    with threadpool_limits(limits=1, user_api="blas"):
        for c in c_grid:
            clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(train_s, train_y)
            accuracy = float((clf.predict(val_s) == val_y).mean())
            loss = float(log_loss(val_y, clf.predict_proba(val_s), labels=clf.classes_))
            grid.append({"C": c, "val_accuracy": accuracy, "val_log_loss": loss})
            if best is None or (accuracy, -loss) > (best[1], -best[2]):
                best = (clf, accuracy, loss, c)
    clf, accuracy, loss, c = best
    if len(clf.classes_) != len(labels):
        raise ValueError("every class must appear in the training split")
    weight = clf.coef_ / scale
    bias = clf.intercept_ - weight @ mean
    return ProbeFit(c, LinearHead(weight.astype(np.float32), bias.astype(np.float32)), accuracy, loss, grid)


def classifier_probe(
    features_file: Path, classifier_dim: int, c_grid: list[float], max_iter: int, seed: int
) -> ProbeFit:
    """A probe on the first `classifier_dim` embedding columns of a candidate's embeddings file:
    the pre-logits features, i.e. what the model's own classifier sees (the LP-FT start when the
    baseline probe is on fused features)."""
    with np.load(features_file) as arrays:
        train_x, val_x = arrays["train_x"][:, :classifier_dim], arrays["val_x"][:, :classifier_dim]
        return fit_probe(train_x, arrays["train_y"], val_x, arrays["val_y"], c_grid, max_iter, seed)
