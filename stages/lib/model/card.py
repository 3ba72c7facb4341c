"""The model card: what a saved model folder holds, as one typed, versioned schema, written and read here.

- `BaselineCard` (the baseline's config.json, written by features): the chosen backbone and its weight
  source, the probe's settings and scores, the preprocessing contract and, with `features.fusion_mode`,
  the fusion head finetune starts from. (Folders written before it was renamed hold it as probe.json:
  it is read from there, with a note.)
- `FinetunedCard` (the fine-tuned model's config.json, written by finetune with the weights,
  `save_finetuned`; evaluate, export, predict and the MLflow pyfunc read it): everything needed to rebuild
  and feed the fine-tuned model.
- `build_model()`: the one way a network is made from a card's settings (name, classes, fusion).

`card_version` says which schema wrote a file; files written before it existed read as version 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from stages.lib.core.errors import PipelineError
from stages.lib.data.preprocessing import DataConfig
from stages.lib.model.abstention import AbstainSpec
from stages.lib.model.backbones import create_backbone
from stages.lib.model.fusion import fused_model

log = logging.getLogger(__name__)
CARD_VERSION = 1


class FusionSpec(BaseModel):
    """A fusion head over the backbone's last `stages` feature stages (see fusion.py)."""

    model_config = ConfigDict(extra="forbid")
    mode: str
    stages: int
    dim: int


class BaselineFusion(FusionSpec):
    """The features stage's fusion head, with the widths of its sources and its val accuracy."""

    sources: list[int]
    val_accuracy: float


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    FILE: ClassVar[str] = "config.json"
    FORMER_FILE: ClassVar[str | None] = None  # the name older folders hold the card under

    @property
    def preprocessing(self) -> DataConfig:
        """The preprocessing contract (`data_config`) as an object."""
        return DataConfig.from_dict(self.data_config, self.FILE)  # type: ignore[attr-defined]

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.model_dump(exclude_none=True), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, source: str | Path):
        """A card from its folder (or its file)."""
        path = Path(source)
        if path.is_dir():
            former = path / cls.FORMER_FILE if cls.FORMER_FILE else None
            path = former if former and former.is_file() and not (path / cls.FILE).is_file() else path / cls.FILE
            if path == former:
                log.info("%s: a card under its former name (re-run the stage that wrote it to rename it)", path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise PipelineError(f"{path}: not found (expected the {cls.FILE} of a model folder)") from None
        except json.JSONDecodeError as error:
            raise PipelineError(f"{path}: not JSON ({error})") from None
        version = values.get("card_version", 1) if isinstance(values, dict) else 1
        if isinstance(version, int) and version > CARD_VERSION:
            raise PipelineError(
                f"{path}: card_version {values['card_version']} is newer than this code reads "
                f"({CARD_VERSION}); update the project"
            )
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in error.errors())
            raise PipelineError(f"{path}: not a valid {cls.FILE} ({problems})") from None


class BaselineCard(_Card):
    """The baseline's card: the chosen backbone and its probe (head.pt), the LP-FT start, the fusion head."""

    FORMER_FILE: ClassVar[str | None] = "probe.json"
    model: str
    weights: str
    classes: list[str]
    embedding_dim: int
    classifier_dim: int
    fusion_stages: int
    C: float
    grid: list[dict[str, Any]]
    classifier_C: float
    features: str
    data_config: dict[str, Any]
    fusion: BaselineFusion | None = None
    card_version: int = CARD_VERSION

    @property
    def fusion_spec(self) -> FusionSpec | None:
        """The fusion head's architecture (what a model built from this baseline needs), or None."""
        return FusionSpec(**self.fusion.model_dump(include={"mode", "stages", "dim"})) if self.fusion else None


class FinetunedCard(_Card):
    """The fine-tuned model's card (config.json beside model.pt): how to rebuild and feed the model."""

    model: str
    num_classes: int
    classes: list[str]
    data_config: dict[str, Any]
    temperature: float = 1.0
    classifier: str = "classifier"
    kept_epoch: int | None = None
    fusion: FusionSpec | None = None
    abstain: AbstainSpec | None = None  # the abstain rule (model/abstention.py); cards without it answer everything
    card_version: int = CARD_VERSION

    def build_model(self) -> nn.Module:
        """The network of this card, without weights (load model.pt into it)."""
        return build_model(self.model, self.num_classes, fusion=self.fusion)


def save_finetuned(folder: Path, model: nn.Module, card: FinetunedCard) -> None:
    """The fine-tuned model's folder: its weights (model.pt, from the CPU, contiguous) and its card."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.cpu().to(memory_format=torch.contiguous_format).state_dict(), folder / "model.pt")
    card.write(folder)


def build_model(
    name: str, num_classes: int, weights: str = "none", drop_rate: float = 0.0, fusion: FusionSpec | None = None
) -> nn.Module:
    """A timm backbone `name` with `weights` (see backbones.py) and a classifier of `num_classes`; with
    `fusion`, a `FusedClassifier` whose fresh fusion head replaces that classifier."""
    backbone = create_backbone(name, weights, num_classes, drop_rate)
    if fusion is None:
        return backbone
    return fused_model(backbone, fusion.mode, fusion.stages, fusion.dim, num_classes, drop_rate)
