"""An exponential moving average (EMA) of the weights: timm's ModelEma, TF's
ExponentialMovingAverage (config `optim.ema_decay`, `optim.ema_warmup`).

Published recipes from EfficientNet (Tan & Le 2019) to DeiT (Touvron et al. 2021) report the
average of the weights over the last thousands of updates, not the last weights: it smooths
out the noise of the final updates. The train step (zoo/training/step.py) updates it after
each optimizer update, the loop evaluates it beside the trained weights (`ema_*` metrics) and
`zoo.load_classifier` predicts with it.

    ema = init_ema(params, model_state)
    ema = update_ema(ema, params, model_state, ema_decay(step, 0.9999, warmup=True))

It averages the model state (BatchNorm's running statistics) too, as timm's ModelEmaV2
averages the whole state_dict: statistics that match the averaged weights, without
recomputing them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def check_ema_decay(decay: float) -> None:
    """ValueError unless 0 <= `decay` < 1 (config `optim.ema_decay`)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(
            f"optim.ema_decay must be in [0, 1) (0 = no EMA; recipes use 0.9999), got {decay}"
        )


def init_ema(params: Any, model_state: Any) -> dict[str, Any]:
    """The EMA at the start: a copy of the weights (a copy: the train step donates the state,
    and one buffer cannot be donated twice)."""
    return jax.tree.map(jnp.copy, {"params": params, "model_state": model_state})


def ema_decay(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """The decay of the update after optimizer update `step` (0-based: the state's step
    before it is incremented), float32.

    With `warmup`, TF's `num_updates` form: min(decay, (1 + step) / (10 + step)), so that the
    first averages follow the weights instead of holding on to the random initialisation
    (at 0.9999 it would weigh in for some 10,000 updates).
    """
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema: dict[str, Any], params: Any, model_state: Any, decay: jax.Array) -> dict:
    """decay * ema + (1 - decay) * new, leaf by leaf, for the params and the model state.

    Each average keeps its leaf's dtype (a bfloat16 parameter's stays bfloat16, so the state's
    layout does not change); leaves that are not floating point (counters) take the new value.
    (DINO's teacher EMA, zoo/methods/base.py `ema`, has neither need.)
    """

    def average(old, new):
        if not jnp.issubdtype(old.dtype, jnp.floating):
            return new
        return (decay * old + (1.0 - decay) * new).astype(old.dtype)

    return jax.tree.map(average, ema, {"params": params, "model_state": model_state})
