"""Frozen-backbone embeddings and the linear probe (the feature-extraction baseline).

The probe is scikit-learn's logistic regression on standardised pooled embeddings, its
regularisation tuned on val. The scaler is folded into the weights, so the probe is exactly a
linear layer on raw embeddings: the starting head for fine-tuning (LP-FT).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stages.lib.prepared import normalize


@torch.inference_mode()
def extract_embeddings(model: nn.Module, images: np.ndarray, mean, std, batch_size: int) -> np.ndarray:
    """Pooled pre-logits features of uint8 NHWC images: float32 (N, model.num_features)."""
    model.eval()
    model = model.to(memory_format=torch.channels_last)
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="embed", unit="batch", mininterval=2):
        batch = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2)
        features = model.forward_head(model.forward_features(normalize(batch, mean, std)), pre_logits=True)
        chunks.append(features.float().numpy())
    return np.concatenate(chunks)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
              c_grid: list[float], max_iter: int, seed: int) -> dict:
    """Logistic regression for each C; keep the best val accuracy (ties: lower val log loss).

    Returns {'C', 'weight' (classes x features), 'bias', 'val_accuracy', 'val_log_loss', 'grid'}
    with the standardisation folded into weight and bias.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    train_s, val_s = scaler.transform(train_x), scaler.transform(val_x)
    labels = np.arange(int(max(train_y.max(), val_y.max())) + 1)
    best, grid = None, []
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
    scale = scaler.scale_
    weight = clf.coef_ / scale
    bias = clf.intercept_ - weight @ scaler.mean_
    return {"C": c, "weight": weight.astype(np.float32), "bias": bias.astype(np.float32),
            "val_accuracy": accuracy, "val_log_loss": loss, "grid": grid}


def probe_logits(embeddings: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return embeddings @ weight.T + bias
