"""BatchNorm and LayerNorm: flax's, with the same parameters, statistics and results; on CPU
their training gradients are hand-written (zoo/cpu/norms.py, `CpuPolicy.batch_norm_vjp` and
`layer_norm_vjp`). Elsewhere (evaluation, other backends or dtypes, masks, cross-device
statistics under pmap, other axes) they are flax's own."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.cpu import current
from zoo.cpu.norms import batch_norm_train, layer_norm_with_vjp


def _hand_written_applies(norm: nn.Module, x: jax.Array, mask) -> bool:
    """What the hand-written gradients need: applied (not initialised), float32 throughout,
    scale and bias, no mask, no cross-device statistics."""
    return not (
        norm.is_initializing()
        or mask is not None
        or norm.axis_name is not None
        or not (norm.use_scale and norm.use_bias)
        or {x.dtype, jnp.dtype(norm.param_dtype), jnp.dtype(norm.dtype or x.dtype)}
        != {jnp.dtype(jnp.float32)}
    )


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` whose training-mode gradient is the textbook one on CPU (module doc)."""

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        running = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        policy = current()
        plain = (
            running
            or policy is None
            or not policy.batch_norm_vjp
            or not _hand_written_applies(self, x, mask)
            or self.axis not in (-1, x.ndim - 1)
            or not self.use_fast_variance
        )
        if plain:
            return super().__call__(x, use_running_average, mask=mask)
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` whose gradient over the last axis is the textbook one on CPU (module
    doc; the two-pass variance only)."""

    @nn.compact
    def __call__(self, x, *, mask=None):
        last_axis = (-1, x.ndim - 1, (-1,), (x.ndim - 1,))
        policy = current()
        plain = (
            policy is None
            or not policy.layer_norm_vjp
            or not _hand_written_applies(self, x, mask)
            or self.reduction_axes not in last_axis
            or self.feature_axes not in last_axis
            or self.use_fast_variance
        )
        if plain:
            return super().__call__(x, mask=mask)
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        return layer_norm_with_vjp(x, scale, bias, self.epsilon)


def layer_norm(epsilon: float = 1e-6, dtype: Any = jnp.float32, **kw) -> nn.LayerNorm:
    """torch-equivalent LayerNorm: two-pass variance (flax's default fast variance,
    E[x^2] - E[x]^2, loses digits on large activations and breaks 1e-4 parity with timm)."""
    return LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=False, **kw)
