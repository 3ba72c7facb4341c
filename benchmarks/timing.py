"""The timer the benchmark scripts share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

Result = TypeVar("Result")


def timed(function: Callable[[], Result], device: torch.device) -> tuple[float, Result]:
    """(wall seconds, result) of one call; on CUDA, queued GPU work counts (synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, result
