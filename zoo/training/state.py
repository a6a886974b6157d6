"""TrainState: everything a run carries from step to step, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """The train state of any method.

    Attributes:
      step: number of optimizer updates done (int32 scalar).
      params: trainable parameters.
      model_state: non-trainable model collections, e.g. {"batch_stats": ...}.
      opt_state: optax state.
      extra: method state that is not trained by gradients (EMA teacher, DINO centre).
      ema: the exponential moving average of the weights, {"params": ..., "model_state": ...}
        (config `optim.ema_decay`, zoo/training/ema.py), or None without one. Checkpoints
        leave a None out (zoo/training/checkpoint.py `state_tree`), so runs without an EMA
        write and read the same checkpoints as before it existed.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    extra: Any
    ema: Any = None
