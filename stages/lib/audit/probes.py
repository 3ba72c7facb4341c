"""What the audit reads, and the out-of-sample class probabilities it scores with.

Every image of every split is read with its embedding from the features stage's cache for the chosen
backbone (`BaselineCard.features`), in the order of the split files (the prepared cache's order): nothing
is decoded again. The probabilities come from k-fold probes on the standardised embeddings: each image is
scored by probes that never saw it, nor any image of its near-copy group (the folds are grouped by the
manifest's `group`), as cleanlab needs. Two probes vote (scikit-learn's soft `VotingClassifier`): a
logistic regression, and the distance-weighted vote of the nearest neighbours by cosine similarity. The
neighbours follow classes that are several clusters (a letter in many fonts, a product photographed from
several sides) where one linear boundary errs; their mean is the better-judged probability.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.data.images import read_labelled_csv
from stages.lib.data.splits import SPLITS
from stages.lib.model.card import BaselineCard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditSet:
    table: pd.DataFrame  # one row per image: path, label, split, row (index in its split), group
    features: np.ndarray  # float32 (n, d): the chosen backbone's embeddings
    labels: np.ndarray  # int (n,): indexes into classes
    classes: list[str]
    backbone: str


def load_audit_set(splits: Path, baseline: Path, manifest: Path) -> AuditSet:
    """The images of every split with their cached embeddings and near-copy groups."""
    card = BaselineCard.read(baseline)
    with np.load(card.features) as stored:
        features = np.concatenate([stored[f"{split}_x"] for split in SPLITS]).astype(np.float32)
    frames = []
    for split in SPLITS:
        frame = read_labelled_csv(Path(splits) / f"{split}.csv")[["path", "label"]]
        frames.append(frame.assign(split=split, row=np.arange(len(frame))))
    table = pd.concat(frames, ignore_index=True)
    if len(table) != len(features):
        raise ValueError(f"{card.features}: {len(features)} embeddings for {len(table)} images in {splits}")
    groups = read_labelled_csv(manifest).set_index("path").get("group")
    table["group"] = table["path"].map(groups).fillna("") if groups is not None else ""
    labels = table["label"].map({name: index for index, name in enumerate(card.classes)}).to_numpy()
    return AuditSet(table=table, features=features, labels=labels, classes=list(card.classes), backbone=card.model)


def standardised(features: np.ndarray) -> np.ndarray:
    mean, std = features.mean(axis=0), features.std(axis=0)
    return (features - mean) / np.where(std > 1e-6, std, 1.0)


def out_of_sample_probabilities(
    data: AuditSet,
    folds: int,
    C: float,
    max_iter: int,
    seed: int,
    components: int | None = None,
    neighbours: int = 20,
) -> np.ndarray:
    """(n, classes) probabilities, each row from probes fit on the folds without that image's group.

    components: the probes see the standardised embeddings' first principal components (fit within each
    fold's training part); None: every dimension. neighbours: the k of the nearest-neighbour probe, whose
    probabilities are averaged with the logistic regression's; 0: the logistic regression alone."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import VotingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    units = data.table["group"].where(data.table["group"] != "", data.table["path"]).to_numpy()
    per_class = pd.Series(units).groupby(data.labels).nunique()
    k = int(min(folds, per_class.min()))
    if k < folds:
        log.info("audit: %d folds (a class has only %d images or groups)", k, per_class.min())
    steps = [StandardScaler()]
    if components and components < min(data.features.shape):
        steps.append(PCA(n_components=components, random_state=seed))
    probe = make_pipeline(*steps, LogisticRegression(C=C, max_iter=max_iter))
    neighbours = min(neighbours, len(data.labels) // 2)  # a training part holds about (k-1)/k of the images
    if neighbours:
        vote = KNeighborsClassifier(n_neighbors=neighbours, weights="distance")
        nearest = make_pipeline(*steps, Normalizer(), vote)  # unit length: Euclidean order is cosine order
        probe = VotingClassifier([("logistic", probe), ("neighbours", nearest)], voting="soft")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return cross_val_predict(probe, data.features, data.labels, groups=units, cv=cv, method="predict_proba")
