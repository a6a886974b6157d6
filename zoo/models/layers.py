"""Blocks shared by model families."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drops the whole residual branch per example.

    Kept examples are scaled by 1 / (1 - rate) so the expectation is unchanged. Uses the
    'dropout' rng stream.
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C], accumulated in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
