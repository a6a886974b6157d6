"""Hand-written gradients of BatchNorm's and LayerNorm's normalisation and of max pooling.

JAX's derivatives of flax's normalisations reached XLA:CPU as more reductions and elementwise
passes than the textbook gradients need (two reductions, one elementwise pass), and as YNNPACK
reductions that took the broadcast scale and per-token statistics as buffers. JAX's
derivative of `lax.reduce_window`'s max is a variadic reduce-window carrying the arg-max,
which XLA:CPU ran several times slower than the hand-written one. Each is a
`CpuPolicy` field (`batch_norm_vjp`, `layer_norm_vjp`, `max_pool_vjp`); measurements in
benchmarks/SPEED.md, "CPU policy fields".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from zoo.cpu.depthwise import shifted_windows


def _batch_norm_forward(x, scale, bias, epsilon):
    """(y, mean, var) of training-mode BatchNorm over [B, H, W] as flax computes them
    (variance as E[x^2] - E[x]^2, clipped at 0), and the residuals of the backward pass."""
    n = x.size // x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    mean = x.sum(axes) / n
    var = jnp.maximum((x * x).sum(axes) / n - mean * mean, 0.0)
    inverse = lax.rsqrt(var + epsilon)
    y = (x - mean) * (inverse * scale) + bias
    return (y, mean, var), (x, mean, inverse, scale)


def _batch_norm_backward(epsilon, residuals, cotangents):
    """The textbook BatchNorm gradient: two reductions (sum of g, sum of g * x_hat), then one
    elementwise pass; the statistics' own cotangents (zero in a train step) are added."""
    grad, grad_mean, grad_var = cotangents
    x, mean, inverse, scale = residuals
    n = x.size // x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    centred = x - mean
    x_hat = centred * inverse
    grad_bias, grad_scale = grad.sum(axes), (grad * x_hat).sum(axes)
    grad_x = (inverse * scale) * (grad - grad_bias / n - x_hat * (grad_scale / n))
    grad_x = grad_x + (grad_mean + 2 * grad_var * centred) / n
    return grad_x, grad_scale, grad_bias


# epsilon is static: nondiff_argnums.
batch_norm_train = jax.custom_vjp(
    lambda x, scale, bias, epsilon: _batch_norm_forward(x, scale, bias, epsilon)[0],
    nondiff_argnums=(3,),
)
batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


def _layer_norm_forward(x, scale, bias, epsilon):
    """LayerNorm over the last axis as flax computes it with the two-pass variance, and the
    residuals of the backward pass (x and the per-token mean and inverse deviation)."""
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    inverse = lax.rsqrt((centred * centred).mean(-1, keepdims=True) + epsilon)
    return centred * (inverse * scale) + bias, (x, mean, inverse, scale)


def _layer_norm_backward(epsilon, residuals, grad):
    """The textbook gradient: per token two sums over the features, then one elementwise
    pass; the parameters' gradients are two sums over the tokens."""
    x, mean, inverse, scale = residuals
    features = x.shape[-1]
    x_hat = (x - mean) * inverse
    grad_hat = grad * scale
    mean_grad = grad_hat.sum(-1, keepdims=True) / features
    mean_grad_x_hat = (grad_hat * x_hat).sum(-1, keepdims=True) / features
    grad_x = inverse * (grad_hat - mean_grad - x_hat * mean_grad_x_hat)
    tokens = tuple(range(x.ndim - 1))
    return grad_x, (grad * x_hat).sum(tokens), grad.sum(tokens)


layer_norm_with_vjp = jax.custom_vjp(
    lambda x, scale, bias, epsilon: _layer_norm_forward(x, scale, bias, epsilon)[0],
    nondiff_argnums=(3,),
)
layer_norm_with_vjp.defvjp(_layer_norm_forward, _layer_norm_backward)


def _window_max(x: jax.Array, window, strides, pads) -> jax.Array:
    taps = shifted_windows(x, window, strides, pads, pad_value=-jnp.inf)
    out = taps[0]
    for tap in taps[1:]:
        out = jnp.maximum(out, tap)
    return out


def _window_max_forward(x, window, strides, pads):
    out = _window_max(x, window, strides, pads)
    return out, (x, out)


def _window_max_backward(window, strides, pads, residuals, grad):
    """Each output's gradient goes to the first tap (row-major) that holds the maximum, as in
    XLA's select-and-scatter (and PyTorch): masks from the shifted windows, then the
    transpose of the strided slices (pads, summed)."""
    x, out = residuals
    taken = jnp.zeros(out.shape, bool)
    firsts = []
    for tap in shifted_windows(x, window, strides, pads, pad_value=-jnp.inf):
        first = (tap == out) & ~taken
        taken = taken | first
        firsts.append(first)

    def chosen(x):
        taps = shifted_windows(x, window, strides, pads)
        return sum(jnp.where(first, tap, 0) for first, tap in zip(firsts, taps, strict=True))

    return jax.vjp(chosen, x)[1](grad)


# window, strides and pads are static (hashable tuples): nondiff_argnums.
window_max = jax.custom_vjp(_window_max, nondiff_argnums=(1, 2, 3))
window_max.defvjp(_window_max_forward, _window_max_backward)
