"""Choosing the backbone: probe each candidate, rank them, and pick the one finetune uses.

Per candidate (`features.candidates`): frozen embeddings (cached per candidate, see probe.py), a
linear probe tuned on val (val accuracy and log loss: the test split is never looked at here, it is
only reported by evaluate), the backbone's parameter count (without the classifier), the embedding
dimension, and CPU latency per image (batch 1 at the cache's image
size, one thread, `backbones.cpu_latency_ms`, the whole classifier, fusion or not).

Ranking: val accuracy (higher first), then val log loss (lower), then parameters (fewer).
Selection (`features.select.rule`):
- `best_val`: the first of the ranking.
- `latency_budget`: the first of the ranking whose latency is at most `latency_budget_ms`
  (measured on this machine: the choice follows the machine the stage runs on).
- `fixed`: the candidate named `select.name`, whatever its rank.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from stages.lib.core.errors import PipelineError
from stages.lib.core.params import Candidate, Features, Select
from stages.lib.data.prepared import load_meta
from stages.lib.data.preprocessing import for_backbone
from stages.lib.model.backbones import WeightsError, backbone_params, cpu_latency_ms, create_backbone, pypi_checkpoint
from stages.lib.model.fusion import check_fusion, prelogits_width
from stages.lib.training.fusion_training import FusionFit
from stages.lib.training.probe import (
    ProbeFit,
    cache_file,
    cache_key,
    embed_splits,
    file_stem,
    fit_probe,
    load_cached,
    prepared_digest,
    prune_cache,
    save_cached,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
LATENCY_SECONDS = 0.5  # measuring time per candidate


class SelectionError(PipelineError, ValueError):
    """No candidate satisfies the selection rule."""


@dataclass
class Entry:
    """One candidate's row of the leaderboard; `probe`, `classifier_dim` and `data_config` stay out of the table."""

    name: str
    weights: str
    val_accuracy: float
    val_log_loss: float
    C: float
    params: int
    embedding_dim: int
    latency_ms: float
    features: str
    classifier_dim: int = 0  # the model classifier's input: the first columns of the embeddings
    probe: ProbeFit | None = field(default=None, repr=False)
    data_config: dict = field(default_factory=dict, repr=False)

    def row(self) -> dict:
        hidden = ("probe", "classifier_dim", "data_config")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}


# ------------------------------------------------------------------- probing, measuring
def check_candidates(candidates: list[Candidate], fusion_stages: int = 0) -> None:
    """Fail before any work when a candidate's timm name or weight source is unusable, or it has fewer
    feature stages than `fusion_stages`."""
    import difflib

    import timm

    for candidate in candidates:
        if not timm.is_model(candidate.name):
            close = difflib.get_close_matches(candidate.name, timm.list_models(), n=1)
            raise PipelineError(
                f"features.candidates: '{candidate.name}' is not a timm model"
                + (f" (did you mean '{close[0]}'?)" if close else "")
            )
        try:
            if candidate.weights == "pypi":
                pypi_checkpoint(candidate.name)
            elif candidate.weights not in ("imagenet", "none") and not Path(candidate.weights).is_file():
                raise WeightsError(f"'{candidate.weights}' is not one of pypi, imagenet, none, nor an existing file")
        except WeightsError as error:
            raise WeightsError(f"features.candidates {candidate.name}: {error}") from None
        if fusion_stages:
            check_fusion(timm.create_model(candidate.name, pretrained=False), fusion_stages)


def probe_candidate(
    candidate: Candidate,
    prepared: Path,
    data_digest: str,
    cache: Path,
    out: Path,
    settings: Features,
    seed: int,
    device: torch.device,
) -> Entry:
    """Probe one of `features.candidates` on the prepared cache (whose digest is `data_digest`).

    Its embeddings come from `cache` or are extracted and cached, then copied to `out/<name>.npz`;
    `settings` is the `features` params section. Returns its leaderboard entry with the probe head.
    """
    name, weights = candidate.name, candidate.weights
    meta = load_meta(prepared)
    size, classes = meta["image_size"], meta["classes"]
    torch.manual_seed(seed)  # random weights (`none`) do not depend on the candidate's position
    model = create_backbone(name, weights, num_classes=len(classes))
    config = for_backbone(name, size, meta["interpolation"]).as_dict()
    precision = "bf16" if device.type == "cuda" else "fp32"
    cached = cache_file(cache, cache_key(name, weights, size, settings.fusion_stages, data_digest, seed, precision))
    arrays = load_cached(cached)
    if arrays is None:
        log.info("%s: extracting embeddings -> %s", name, cached)
        arrays = embed_splits(model, prepared, config, settings.batch_size, settings.fusion_stages, device)
        save_cached(cached, arrays)
    else:
        log.info("%s: embeddings from the cache %s", name, cached)
    path = out / f"{file_stem(name)}.npz"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, path)
    probe = fit_probe(
        arrays["train_x"], arrays["train_y"], arrays["val_x"], arrays["val_y"], settings.C, settings.max_iter, seed
    )
    entry = Entry(
        name=name,
        weights=weights,
        val_accuracy=probe.val_accuracy,
        val_log_loss=probe.val_log_loss,
        C=probe.C,
        params=backbone_params(model),
        embedding_dim=int(arrays["train_x"].shape[1]),
        latency_ms=cpu_latency_ms(model, size, LATENCY_SECONDS),
        features=str(path),
        classifier_dim=prelogits_width(model),
        probe=probe,
        data_config=config,
    )
    log.info("%s: probe val %.4f, %d-d, %.1f ms/img", name, entry.val_accuracy, entry.embedding_dim, entry.latency_ms)
    return entry


def probe_candidates(
    candidates: list[Candidate],
    prepared: Path,
    cache: Path,
    out: Path,
    settings: Features,
    seed: int,
    device: torch.device,
) -> list[Entry]:
    """`probe_candidate` for each candidate on the prepared cache; then the embedding cache keeps only the
    most recently used data versions."""
    digest = prepared_digest(prepared)
    entries = [probe_candidate(c, prepared, digest, cache, out, settings, seed, device) for c in candidates]
    for stale in prune_cache(cache, digest):
        log.info("removed cached embeddings of an older data version: %s", stale)
    return entries


# ----------------------------------------------------------------------- ranking, choosing
def rank(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (-e.val_accuracy, e.val_log_loss, e.params))


def choose(entries: list[Entry], select: Select) -> Entry:
    """The candidate the rule in `features.select` picks (see the module docstring)."""
    ranked = rank(entries)
    if select.rule == "fixed":
        return next(entry for entry in ranked if entry.name == select.name)
    if select.rule == "latency_budget":
        within = [entry for entry in ranked if entry.latency_ms <= select.latency_budget_ms]
        if not within:
            fastest = min(entries, key=lambda e: e.latency_ms)
            raise SelectionError(
                f"features.select.latency_budget_ms={select.latency_budget_ms}: no candidate is "
                f"that fast here (fastest: {fastest.name}, {fastest.latency_ms:.1f} ms)"
            )
        return within[0]
    return ranked[0]


def leaderboard(entries: list[Entry], winner: Entry, select: Select) -> "pd.DataFrame":
    """The leaderboard table: one row per candidate in rank order, with the rule and the winner marked."""
    import pandas as pd

    rows = [
        {"rank": position, "candidate": entry.name, "chosen": entry.name == winner.name, "rule": select.rule}
        | {k: v for k, v in entry.row().items() if k not in ("name", "features")}
        for position, entry in enumerate(rank(entries), start=1)
    ]
    return pd.DataFrame(rows)


def with_fusion_rows(
    board: "pd.DataFrame", winner: Entry, prelogits_probe: ProbeFit, mode: str, fused: FusionFit
) -> "pd.DataFrame":
    """The leaderboard with a `head` column (`logreg`: the candidates' probes) and two rows for the
    chosen backbone: `logreg_prelogits` (the probe without fusion: pre-logits features only) and the
    fusion head of `mode` (its latency is the whole fused model's)."""
    import pandas as pd

    extra = [
        {
            "rank": None,
            "candidate": winner.name,
            "chosen": False,
            "rule": board["rule"].iloc[0],
            "head": "logreg_prelogits",
            "weights": winner.weights,
            "val_accuracy": prelogits_probe.val_accuracy,
            "val_log_loss": prelogits_probe.val_log_loss,
            "C": prelogits_probe.C,
            "params": winner.params,
            "embedding_dim": winner.classifier_dim,
            "latency_ms": winner.latency_ms,
        },
        {
            "rank": None,
            "candidate": winner.name,
            "chosen": False,
            "rule": board["rule"].iloc[0],
            "head": mode,
            "weights": winner.weights,
            "val_accuracy": fused.training.val_accuracy,
            "val_log_loss": fused.training.val_loss,
            "C": None,
            "params": fused.params,
            "embedding_dim": winner.embedding_dim,
            "latency_ms": fused.latency_ms,
            "head_params": fused.training.parameters,
        },
    ]
    classes = len(prelogits_probe.head.bias)
    board = board.assign(head="logreg", head_params=(board["embedding_dim"] + 1) * classes)
    extra[0]["head_params"] = (winner.classifier_dim + 1) * classes
    return pd.concat([board, pd.DataFrame(extra)], ignore_index=True)


# ---------------------------------------------------------------------------------- figure
def leaderboard_figure(entries: list[Entry], winner: Entry, path: Path, budget_ms: float | None = None) -> None:
    """Two panels: probe accuracy per candidate; val accuracy against latency (marker area ~ parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = rank(entries)
    names = [entry.name for entry in ranked]
    figure, (bars, scatter) = plt.subplots(1, 2, figsize=(13, max(4.0, 0.5 * len(ranked) + 2.5)))
    positions = np.arange(len(ranked))
    bars.barh(positions, [e.val_accuracy for e in ranked], height=0.6)
    bars.set_yticks(positions, [f"{n} *" if n == winner.name else n for n in names])
    bars.invert_yaxis()
    bars.set_xlim(max(0.0, min(e.val_accuracy for e in ranked) - 0.05), 1.0)
    bars.set_xlabel("linear-probe val accuracy")
    bars.set_title("candidates by val accuracy (* chosen)")
    largest = max(e.params for e in ranked)
    for entry in ranked:
        chosen = entry.name == winner.name
        scatter.scatter(
            entry.latency_ms,
            entry.val_accuracy,
            s=60 + 600 * entry.params / largest,
            alpha=0.6,
            edgecolors="black" if chosen else "none",
            linewidths=2,
        )
        scatter.annotate(
            f"{entry.name}\n{entry.params / 1e6:.1f}M params, {entry.embedding_dim}-d",
            (entry.latency_ms, entry.val_accuracy),
            fontsize=8,
            xytext=(6, 6),
            textcoords="offset points",
        )
    if budget_ms is not None:
        scatter.axvline(budget_ms, color="grey", linestyle="--", label=f"budget {budget_ms:g} ms")
        scatter.legend(loc="lower right")
    scatter.margins(x=0.35, y=0.3)
    scatter.set_xlabel("CPU latency per image, batch 1, one thread (ms)")
    scatter.set_ylabel("val accuracy")
    scatter.set_title("accuracy against cost (area ~ parameters)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def log_leaderboard(board: "pd.DataFrame", figure: Path) -> None:
    """The leaderboard as an MLflow table (sortable in the UI) and the figure as an artifact."""
    import mlflow

    mlflow.log_table(board, artifact_file="leaderboard/leaderboard.json")
    mlflow.log_artifact(str(figure), artifact_path="leaderboard")
    winner = board[board["chosen"]].iloc[0]
    mlflow.set_tags({"model.name": winner["candidate"], "features.rule": winner["rule"]})
