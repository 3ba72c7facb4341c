"""Temperature scaling (Guo et al., 2017): one temperature fitted on val, stored with the model, so served
probabilities are calibrated."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from stages.lib.data.preprocessing import DataConfig
from stages.lib.training.loaders import Inputs
from stages.lib.training.loop import loader_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """The fitted temperature and the val negative log-likelihood before and after dividing by it."""

    temperature: float
    val_nll_before: float
    val_nll_after: float


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.25, 4.0)) -> float:
    """The T minimising the negative log-likelihood of softmax(logits / T) on held-out data (val), searched
    on log T within `bounds` (scipy). The lower bound matters on a near-perfect val set, where the NLL
    optimum runs to extreme sharpness."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits, rows = np.asarray(logits, dtype=np.float64), np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    return float(np.exp(minimize_scalar(nll, bounds=tuple(np.log(bounds)), method="bounded").x))


def calibrate(
    model: nn.Module, val_loader: DataLoader, data_config: DataConfig, bounds: tuple[float, float]
) -> Calibration:
    """Temperature scaling of model, fitted on the logits of val_loader within bounds."""
    device = next(model.parameters()).device
    logits, labels = loader_logits(model, val_loader, Inputs(data_config.mean, data_config.std, device))
    temperature = fit_temperature(logits.numpy(), labels.numpy(), tuple(bounds))
    before = torch.nn.functional.cross_entropy(logits, labels).item()
    after = torch.nn.functional.cross_entropy(logits / temperature, labels).item()
    log.info("temperature %.3f fitted on val: NLL %.4f -> %.4f", temperature, before, after)
    return Calibration(temperature, before, after)
