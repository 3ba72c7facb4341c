"""Feature fusion: a head over several depths of a timm backbone, and the model that carries it.

Sources (S = K + 1 of them, in this order): the backbone's pooled pre-logits features (N, D0) and
the global-average-pooled outputs of its last K feature stages (N, C1) ... (N, CK), shallow to deep
(timm's `forward_intermediates(indices=K)`). Concatenated, they are exactly the embeddings the
features stage caches (`probe.extract_embeddings`), so a `FusionHead` trains on the cached embeddings
and then sits on the live backbone unchanged.

`FusionHead(source_dims, num_classes, mode, dim, drop_rate)`: (N, sum(source_dims)) -> (N, num_classes).
Every source is first layer-normalised (pooled stages differ in scale by orders of magnitude).
- `concat`: the normalised sources concatenated, dropout, one linear layer (no projection).
- `gated`: each source projected to `dim` (N, S, dim); a sigmoid gate per source and sample, computed
  from that source's projection (N, S), scales it; the gated projections are summed (N, dim),
  dropout, linear.
- `attention`: each source projected to `dim`; additive attention scores per source
  (v . tanh(W p_s)), softmax across the sources (N, S, summing to 1); the weighted sum (N, dim),
  dropout, linear.
`source_weights(x)` gives (N, S) weights of a batch, each row what each source contributes: the gates
(gated), the attention weights (attention), or for concat each source's share of the predicted class's
logit (the sum of |weight x feature| over the source's columns, normalised to sum to 1 per image).

`FusedClassifier(backbone, head, fusion_stages)`: normalised images (N, 3, H, W) -> logits, the contract
of a timm model, so `NormalizedClassifier`, the trainer's phases (`classifier_prefix`, `group_matcher`),
ONNX/TorchScript export and `serving.ImageClassifier` work unchanged; the head is the classifier.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from stages.lib.core.errors import PipelineError

FUSION_MODES = ("concat", "gated", "attention")
FusionMode = Literal["concat", "gated", "attention"]
HEAD = "head"  # the fused model's classifier prefix (trainable in every phase)


def check_fusion(model: nn.Module, fusion_stages: int) -> None:
    """Fail clearly when the backbone cannot give the last `fusion_stages` feature stages."""
    if not fusion_stages:
        return
    name = model.pretrained_cfg.get("architecture", type(model).__name__)
    if not hasattr(model, "forward_intermediates"):
        raise PipelineError(f"features.fusion_stages={fusion_stages}: {name} has no forward_intermediates in timm")
    if fusion_stages > len(model.feature_info):
        raise PipelineError(
            f"features.fusion_stages={fusion_stages}: {name} has only {len(model.feature_info)} feature stages"
        )


def prelogits_width(backbone: nn.Module) -> int:
    """The width of a timm model's pre-logits features (its classifier's input, also once the classifier is reset)."""
    return int(
        getattr(backbone, "head_hidden_size", None)
        or getattr(backbone.get_classifier(), "in_features", None)
        or backbone.num_features
    )


def source_dims(backbone: nn.Module, fusion_stages: int) -> list[int]:
    """Widths of the sources: the pre-logits features, then the last `fusion_stages` stages' channels."""
    check_fusion(backbone, fusion_stages)
    prelogits = prelogits_width(backbone)
    stages = [info["num_chs"] for info in backbone.feature_info[len(backbone.feature_info) - fusion_stages :]]
    return [int(prelogits)] + [int(c) for c in stages] if fusion_stages else [int(prelogits)]


def pooled_sources(backbone: nn.Module, images: torch.Tensor, fusion_stages: int) -> torch.Tensor:
    """(N, sum of source widths): pre-logits features, then the pooled last K stages (the cached embeddings)."""
    if not fusion_stages:
        return backbone.forward_head(backbone.forward_features(images), pre_logits=True)
    final, stages = backbone.forward_intermediates(images, indices=fusion_stages)
    pooled = [backbone.forward_head(final, pre_logits=True)] + [stage.mean(dim=(2, 3)) for stage in stages]
    return torch.cat(pooled, dim=1)


class FusionHead(nn.Module):
    """Logits from the concatenated sources (see the module docstring for the modes and shapes).

    Args:
        source_dims: widths of the S sources, in the order they are concatenated in the input.
        num_classes: outputs.
        mode: concat | gated | attention.
        dim: the width each source is projected to (gated, attention).
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        source_dims: list[int],
        num_classes: int,
        mode: FusionMode = "gated",
        dim: int = 128,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if mode not in FUSION_MODES:
            raise PipelineError(f"features.fusion_mode: unknown mode '{mode}' (one of: {', '.join(FUSION_MODES)})")
        self.source_dims, self.mode, self.dim = [int(d) for d in source_dims], mode, dim
        self.norms = nn.ModuleList(nn.LayerNorm(width) for width in self.source_dims)
        self.drop = nn.Dropout(drop_rate)
        if mode == "concat":
            self.fc = nn.Linear(sum(self.source_dims), num_classes)
            return
        self.projections = nn.ModuleList(nn.Linear(width, dim) for width in self.source_dims)
        if mode == "gated":
            self.gate = nn.Linear(dim, 1)
        else:
            self.score = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1, bias=False))
        self.fc = nn.Linear(dim, num_classes)

    def _sources(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [norm(part) for norm, part in zip(self.norms, torch.split(x, self.source_dims, dim=1))]

    def _weighted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projections (N, S, dim), weights (N, S)) of a gated or attention head."""
        projected = torch.stack([proj(src) for proj, src in zip(self.projections, self._sources(x))], dim=1)
        if self.mode == "gated":
            weights = torch.sigmoid(self.gate(projected).squeeze(-1))
        else:
            weights = torch.softmax(self.score(projected).squeeze(-1), dim=1)
        return projected, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, sum(source_dims)) -> (N, num_classes)."""
        if self.mode == "concat":
            return self.fc(self.drop(torch.cat(self._sources(x), dim=1)))
        projected, weights = self._weighted(x)
        return self.fc(self.drop((projected * weights.unsqueeze(-1)).sum(dim=1)))

    @torch.no_grad()
    def source_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(N, S): gates (gated: each in (0, 1)), attention weights (rows sum to 1), or for concat each source's
        share of the predicted class's logit (rows sum to 1)."""
        if self.mode != "concat":
            return self._weighted(x)[1]
        sources = self._sources(x)
        rows = self.fc.weight[self.fc(torch.cat(sources, dim=1)).argmax(dim=1)]  # (N, D): the predicted class's
        parts = torch.split(rows, self.source_dims, dim=1)
        shares = torch.stack([(weight * source).abs().sum(dim=1) for weight, source in zip(parts, sources)], dim=1)
        return shares / shares.sum(dim=1, keepdim=True).clamp_min(1e-12)


class FusedClassifier(nn.Module):
    """A timm backbone whose classifier is a `FusionHead` over its last `fusion_stages` stages.

    forward: normalised images (N, 3, H, W) -> logits (N, classes). The backbone's own classifier is
    removed (`reset_classifier(0)`); the backbone's dropout rate is not used (the head has its own).
    """

    def __init__(self, backbone: nn.Module, head: FusionHead, fusion_stages: int):
        super().__init__()
        check_fusion(backbone, fusion_stages)
        backbone.reset_classifier(0)
        self.backbone, self.head, self.fusion_stages = backbone, head, fusion_stages
        self.pretrained_cfg = {**backbone.pretrained_cfg, "classifier": HEAD}
        self.num_classes = head.fc.out_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_sources(self.backbone, images, self.fusion_stages))

    def get_classifier(self) -> nn.Module:
        return self.head

    def group_matcher(self, coarse: bool = False):
        """timm's block groups of the backbone (a callable matcher: parameter name -> group ordinal);
        the head is unmatched (the last group), as a timm model's classifier is."""
        from timm.models import group_parameters

        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=coarse))
        ordinal = {f"backbone.{name}": (float(index),) for index, names in groups.items() for name in names}
        return lambda name: ordinal.get(name, (float("inf"),))

    def no_weight_decay(self) -> set[str]:
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{name}" for name in inner}


def fused_model(
    backbone: nn.Module, mode: str, fusion_stages: int, dim: int, num_classes: int, drop_rate: float = 0.0
) -> FusedClassifier:
    """A `FusedClassifier` with a fresh head of `mode` over `backbone`'s pre-logits and last `fusion_stages` stages."""
    head = FusionHead(source_dims(backbone, fusion_stages), num_classes, mode, dim, drop_rate)
    return FusedClassifier(backbone, head, fusion_stages)
