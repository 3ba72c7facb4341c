"""Training a `FusionHead` on cached embeddings, and what it learned (gate/attention weight per source).

The features stage caches, per candidate, embeddings whose columns are the fusion sources in order
(pre-logits features, then the pooled last K stages: `fusion.pooled_sources`). `train_fusion_head`
fits a head on train_x/train_y with AdamW and cross-entropy, evaluates val every epoch, keeps the
epoch of lowest val loss and stops after `patience` epochs without improvement. Only val is used.

`weights_table`: the mean weight of each source over the val set (gate, attention weight, or for concat
its share of the predicted logit), overall (`all`) and per true class; a wide table, one row per source
(what `dvc plots` and the figure draw).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from stages.lib.core.params import Features
from stages.lib.core.params import FusionHead as FusionHeadSettings
from stages.lib.model.backbones import backbone_params, cpu_latency_ms
from stages.lib.model.card import FusionSpec, build_model
from stages.lib.model.fusion import FusionHead
from stages.lib.training.early_stopping import EarlyStopping

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadTraining:
    """How a fusion head's training went: its kept (lowest val loss) epoch's scores, and its cost."""

    val_loss: float
    val_accuracy: float
    best_epoch: int  # the kept epoch
    epochs_run: int
    seconds: float
    parameters: int  # the head's


@dataclass(frozen=True)
class FusionFit:
    """`fuse_winner`'s result: the trained head, how its training went, the whole fused model's CPU latency
    (batch 1, one thread) and backbone parameters, the source widths, and the mean weight per source on val."""

    head: FusionHead
    training: HeadTraining
    latency_ms: float
    params: int
    sources: list[int]
    weights: "pd.DataFrame"

    def metrics(self) -> dict[str, float]:
        """The numbers MLflow records (as `fusion.<name>`)."""
        return asdict(self.training) | {"latency_ms": self.latency_ms, "params": self.params}


def source_names(num_stages: int, fusion_stages: int) -> list[str]:
    """Names of the sources: `pre_logits`, then `stage<i>` for the last `fusion_stages` of the
    backbone's `num_stages` feature stages (timm's feature_info index)."""
    return ["pre_logits"] + [f"stage{index}" for index in range(num_stages - fusion_stages, num_stages)]


def _evaluate(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    head.eval()
    with torch.no_grad():
        logits = head(x)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_fusion_head(
    arrays: dict[str, np.ndarray],
    source_dims: list[int],
    num_classes: int,
    mode: str,
    settings: FusionHeadSettings,
    drop_rate: float,
    seed: int,
) -> tuple[FusionHead, HeadTraining]:
    """A `FusionHead` trained on the cached embeddings `arrays` (train_x/train_y/val_x/val_y).

    settings: the `features.fusion_head` params (dim, epochs, lr, weight_decay, batch_size, patience).
    Returns the head at its best val-loss epoch, in eval mode, and how its training went.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = torch.from_numpy(arrays["train_x"]).float(), torch.from_numpy(arrays["train_y"]).long()
    val_x, val_y = torch.from_numpy(arrays["val_x"]).float(), torch.from_numpy(arrays["val_y"]).long()
    head = FusionHead(source_dims, num_classes, mode, settings.dim, drop_rate)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    stopper = EarlyStopping(settings.patience)
    best, best_state, best_epoch, epoch = None, None, 0, 0
    for epoch in range(1, settings.epochs + 1):
        head.train()
        for index in torch.randperm(len(train_x), generator=generator).split(settings.batch_size):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(head(train_x[index]), train_y[index]).backward()
            optimizer.step()
        loss, accuracy = _evaluate(head, val_x, val_y)
        if stopper.update(loss):
            best, best_state, best_epoch = (loss, accuracy), copy.deepcopy(head.state_dict()), epoch
        elif stopper.should_stop:
            break
    head.load_state_dict(best_state)
    head.eval()
    summary = HeadTraining(
        val_loss=best[0],
        val_accuracy=best[1],
        best_epoch=best_epoch,
        epochs_run=epoch,
        seconds=round(time.perf_counter() - started, 2),
        parameters=sum(p.numel() for p in head.parameters()),
    )
    log.info(
        "fusion head (%s): val %.4f (loss %.4f) at epoch %d of %d, %.1f s",
        mode,
        best[1],
        best[0],
        best_epoch,
        epoch,
        summary.seconds,
    )
    return head, summary


def weights_table(
    head: FusionHead, x: np.ndarray, y: np.ndarray, classes: list[str], names: list[str]
) -> "pd.DataFrame":
    """Mean source weight over the rows of x: columns source, all, then one per class present in y
    (`FusionHead.source_weights`: gates, attention weights, or concat's shares of the predicted logit)."""
    import pandas as pd

    weights = head.source_weights(torch.from_numpy(x).float()).numpy()
    table = {"source": names, "all": weights.mean(axis=0)}
    for index in sorted({int(label) for label in y}):
        table[classes[index]] = weights[y == index].mean(axis=0)
    return pd.DataFrame(table).round(6)


def weights_figure(table: "pd.DataFrame", mode: str, path: Path) -> None:
    """Two panels: the mean weight per source over val; the same per class (a heat map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, heat) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    path.parent.mkdir(parents=True, exist_ok=True)
    if table.empty:
        bars.text(0.5, 0.5, f"fusion_mode {mode}: no learned weights", ha="center")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return
    positions = np.arange(len(table))
    bars.barh(positions, table["all"], height=0.6)
    bars.set_yticks(positions, table["source"])
    bars.invert_yaxis()
    labels = {"gated": "mean gate", "attention": "mean attention weight"}
    bars.set_xlabel(labels.get(mode, "mean share of the predicted logit"))
    bars.set_title(f"{mode} fusion: weight per source (val)")
    per_class = table.drop(columns=["source", "all"]).to_numpy()
    image = heat.imshow(per_class, aspect="auto", cmap="viridis")
    heat.set_yticks(positions, table["source"])
    heat.set_xticks(np.arange(per_class.shape[1]), table.columns[2:], rotation=45, ha="right")
    heat.set_xlabel("true class")
    heat.set_title("per class (val)")
    figure.colorbar(image, ax=heat)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def fuse_winner(
    name: str, features: Path, classes: list[str], image_size: int, settings: Features, drop_rate: float, seed: int
) -> FusionFit:
    """Train the `features.fusion_mode` head on the embeddings of the chosen backbone `name` (its cached
    embeddings file: `features`)."""
    with np.load(features) as stored:
        arrays = {name: stored[name] for name in ("train_x", "train_y", "val_x", "val_y")}
    # shapes and latency only: the backbone's weights do not matter
    model = build_model(
        name,
        len(classes),
        fusion=FusionSpec(mode=settings.fusion_mode, stages=settings.fusion_stages, dim=settings.fusion_head.dim),
    )
    dims = model.head.source_dims
    if sum(dims) != arrays["train_x"].shape[1]:
        raise ValueError(f"{features}: {arrays['train_x'].shape[1]} columns, the sources need {sum(dims)}")
    head, summary = train_fusion_head(
        arrays, dims, len(classes), settings.fusion_mode, settings.fusion_head, drop_rate, seed
    )
    names = source_names(len(model.backbone.feature_info), settings.fusion_stages)
    model.head.load_state_dict(head.state_dict())
    return FusionFit(
        head=head,
        training=summary,
        latency_ms=cpu_latency_ms(model, image_size),
        params=backbone_params(model),
        sources=dims,
        weights=weights_table(head, arrays["val_x"], arrays["val_y"], classes, names),
    )


def write_fusion_weights(fused: FusionFit | None, classes: list[str], mode: str, table: Path, figure: Path) -> None:
    """The fusion head's mean weight per source on val as a CSV (`dvc plots`) and a figure; without a fusion
    head (fusion_mode none) the table has no rows."""
    import pandas as pd

    weights = fused.weights if fused else pd.DataFrame(columns=["source", "all"] + list(classes))
    table.parent.mkdir(parents=True, exist_ok=True)
    weights.to_csv(table, index=False)
    weights_figure(weights, mode, figure)
