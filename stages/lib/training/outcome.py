"""What a fine-tuning run hands on: the card of the model it made, its headline numbers (the metrics file)
and its record in the MLflow run."""

from __future__ import annotations

from torch import nn

from stages.lib.data.preprocessing import DataConfig
from stages.lib.model.backbones import classifier_prefix
from stages.lib.model.card import BaselineCard, FinetunedCard
from stages.lib.training.calibration import Calibration
from stages.lib.training.checkpoint import TrainState
from stages.lib.training.distributed import Distributed


def finetuned_card(
    baseline: BaselineCard,
    classes: list[str],
    data_config: DataConfig,
    model: nn.Module,
    calibration: Calibration,
    state: TrainState,
) -> FinetunedCard:
    """The card of the fine-tuned model: its backbone and head (from the baseline it started from), classes,
    preprocessing contract, temperature and kept epoch."""
    return FinetunedCard(
        model=baseline.model,
        num_classes=len(classes),
        classes=classes,
        data_config=data_config.as_dict(),
        temperature=round(calibration.temperature, 6),
        classifier=classifier_prefix(model),
        kept_epoch=state.kept_epoch,
        fusion=baseline.fusion_spec,
    )


def headline(state: TrainState) -> dict[str, float]:
    """metrics/finetune.json: the kept epoch and its val loss (the temperature is in the card and MLflow)."""
    kept = state.history[state.kept_epoch - 1]
    return {
        "kept_epoch": state.kept_epoch,
        "kept_val_loss": round(kept["val_loss"], 6),
    }


def log_outcome(state: TrainState, calibration: Calibration, seconds: float, dist: Distributed) -> None:
    """The MLflow run's record beyond the per-epoch metrics: the kept epoch's val accuracy, the calibration,
    the training time, the processes and device, the epochs run."""
    import mlflow

    mlflow.log_metrics(
        {
            "kept/val_accuracy": state.history[state.kept_epoch - 1]["val_accuracy"],
            "calibration/temperature": calibration.temperature,
            "calibration/val_nll_before": calibration.val_nll_before,
            "calibration/val_nll_after": calibration.val_nll_after,
            "time/train_seconds": round(seconds, 1),
        }
    )
    mlflow.log_params({"world_size": dist.world_size, "device": dist.device.type, "epochs_run": state.epoch})
