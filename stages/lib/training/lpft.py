"""LP-FT (Kumar et al., 2022): fine-tuning starts from the linear probe, not a random head.

The baseline's folder, written by the features stage (`write_baseline`), holds the start:
`classifier.pt`, a probe on the pre-logits features copied into the timm classifier, or with
`features.fusion_mode` `fusion.pt`, the fusion head trained on the cached embeddings, loaded into the
`FusedClassifier`'s head. Beside it: `head.pt` (the chosen backbone's probe on all its embedding
columns, the baseline evaluate reports) and the baseline's card (`BaselineCard`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from stages.lib.core.digest import bytes_sha256
from stages.lib.core.errors import PipelineError
from stages.lib.core.params import Features, Params
from stages.lib.core.pipeline import stage_params
from stages.lib.model.baseline import load_linear_head, save_linear_head
from stages.lib.model.card import BaselineCard, BaselineFusion, FusionSpec
from stages.lib.training.fusion_training import FusionFit
from stages.lib.training.leaderboard import Entry
from stages.lib.training.probe import ProbeFit, classifier_probe

log = logging.getLogger(__name__)


def lpft_probe(winner: Entry, settings: Features, seed: int) -> ProbeFit:
    """The probe the timm classifier starts from: the winner's own when its embeddings are exactly the
    classifier's input, else (fusion) a probe on the classifier's columns of the same embeddings."""
    if winner.embedding_dim == winner.classifier_dim:
        return winner.probe
    probe = classifier_probe(Path(winner.features), winner.classifier_dim, settings.C, settings.max_iter, seed)
    log.info(
        "LP-FT head: a probe on the %d pre-logits columns (val %.4f; the fused baseline: %.4f)",
        winner.classifier_dim,
        probe.val_accuracy,
        winner.val_accuracy,
    )
    return probe


def write_baseline(
    folder: Path, winner: Entry, lpft: ProbeFit, classes: list[str], settings: Features, fused: FusionFit | None
) -> BaselineCard:
    """The baseline's folder: head.pt (the winner's probe), classifier.pt (the LP-FT start), fusion.pt (with a
    fusion head: finetune's start instead) and the card naming what later stages need."""
    folder.mkdir(parents=True, exist_ok=True)
    save_linear_head(winner.probe.head, folder / "head.pt")
    save_linear_head(lpft.head, folder / "classifier.pt")
    fusion = None
    if fused:
        torch.save(fused.head.state_dict(), folder / "fusion.pt")
        fusion = BaselineFusion(
            mode=settings.fusion_mode,
            stages=settings.fusion_stages,
            dim=settings.fusion_head.dim,
            sources=fused.sources,
            val_accuracy=fused.training.val_accuracy,
        )
    card = BaselineCard(
        model=winner.name,
        weights=winner.weights,
        classes=classes,
        embedding_dim=winner.embedding_dim,
        classifier_dim=winner.classifier_dim,
        fusion_stages=settings.fusion_stages,
        C=winner.C,
        grid=winner.probe.grid,
        classifier_C=lpft.C,
        features=winner.features,
        data_config=winner.data_config,
        fusion=fusion,
    )
    card.write(folder)
    return card


def start_file(baseline: Path, fusion: FusionSpec | None) -> Path:
    """The baseline's file fine-tuning starts from: the fusion head, or the classifier probe."""
    return Path(baseline) / ("fusion.pt" if fusion else "classifier.pt")


def start_from_baseline(model: nn.Module, baseline: Path, fusion: FusionSpec | None) -> Path:
    """Load the LP-FT start from the baseline folder into model's head; return the file it came from."""
    path = start_file(baseline, fusion)
    if fusion:
        try:
            model.head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, FileNotFoundError) as error:
            raise PipelineError(
                f"{path}: does not fit the {fusion.mode} fusion head of {fusion.stages} "
                f"stages ({str(error).splitlines()[0]}); re-run the features stage"
            ) from None
        return path
    head, classifier = load_linear_head(path), model.get_classifier()
    if head.weight.shape != tuple(classifier.weight.shape):
        raise PipelineError(
            f"{path}: a head of shape {head.weight.shape} does not fit the classifier "
            f"{tuple(classifier.weight.shape)}; re-run the features stage"
        )
    with torch.no_grad():
        classifier.weight.copy_(torch.from_numpy(head.weight))
        classifier.bias.copy_(torch.from_numpy(head.bias))
    return path


def fingerprint(params: Params, meta: dict, start: Path) -> str:
    """What a checkpoint must match to be resumed: the params finetune declares in dvc.yaml, the prepared
    data's meta, and the LP-FT start's bytes."""
    settings = params.subset(stage_params("finetune"))
    blob = json.dumps([settings, meta], sort_keys=True).encode() + Path(start).read_bytes()
    return bytes_sha256(blob)
