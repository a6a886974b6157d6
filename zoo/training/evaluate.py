"""Evaluators: run the eval step over a split and reduce (sum, count) pairs to metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from zoo.training.step import device_batch


def evaluate(
    eval_step: Callable, state: Any, batches: Iterable[dict[str, np.ndarray]], mesh
) -> dict[str, Any]:
    """Top-1/top-5 accuracy, mean loss, example count and the confusion matrix [true, pred]."""
    totals = None
    for batch in batches:
        sums = eval_step(state, device_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    if totals is None:
        raise ValueError("the eval split is empty")
    totals = jax.device_get(totals)  # one host sync per evaluation
    count = max(float(totals["count"]), 1.0)
    return {
        "loss": float(totals["loss"]) / count,
        "accuracy": float(totals["top1"]) / count,
        "top5": float(totals["top5"]) / count,
        "count": int(totals["count"]),
        "confusion": np.asarray(totals["confusion"]).round().astype(np.int64),
    }
