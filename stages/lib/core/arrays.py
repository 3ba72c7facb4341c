"""Small numpy helpers shared across layers."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, classes) logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def batched(
    function: Callable[[np.ndarray], np.ndarray], items: np.ndarray, batch_size: int, empty: np.ndarray | None = None
) -> np.ndarray:
    """`function` over `items` in slices of `batch_size`, the outputs concatenated (`empty` when no items)."""
    outputs = [function(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]
    if not outputs:
        if empty is None:
            raise ValueError("no items to run")
        return empty
    return np.concatenate(outputs)
