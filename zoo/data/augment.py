"""Batch ops in JAX, run inside the jitted step and keyed by the step rng.

Array math that is the same for every image (normalisation; later mixup/cutmix and the
SimCLR/DINO colour ops) belongs on the device: uint8 batches cross to the device (4x smaller
than float32) and the ops fuse into the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Batch = dict[str, Any]
Augment = Callable[[Batch, jax.Array], Batch]


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8 [B, H, W, C] in 0..255 -> float32 (x / 255 - mean) / std."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def make_augment(mean: Sequence[float], std: Sequence[float]) -> Augment:
    """The device-side batch transform of a run: `augment(batch, rng) -> batch`."""
    mean, std = tuple(mean), tuple(std)

    def augment(batch: Batch, rng: jax.Array) -> Batch:
        del rng  # no random batch ops yet; mixup/cutmix and colour ops will use it.
        return {**batch, "image": normalize(batch["image"], mean, std)}

    return augment
