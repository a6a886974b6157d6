"""2-D convolution on XLA:CPU by the fastest route for its shape; XLA's native convolution
elsewhere.

Routes (`conv2d`), each computing `lax.conv_general_dilated`'s function:
* 1x1 (any stride), and non-overlapping patches (stride = kernel, VALID): a reshape and one
  matmul (zoo/cpu/matmul.py).
* depthwise (groups = input channels = output channels): shifted multiply-adds
  (zoo/cpu/depthwise.py).
* 3x3 at stride 1 with padding 1 and enough channels in and out, float32: Winograd's
  F(2x2, 3x3) (zoo/cpu/winograd.py).
* everything else: XLA's convolution, its input kept for the backward pass as one buffer
  (`CpuPolicy.conv_input_buffer`: XLA had pulled the input's producers into the transposing
  copy of the kernel gradient and recomputed them there). Where XLA:CPU hands convolutions to
  YNNPACK, whose gradients are slow (`CpuPolicy.ynn_convolutions`), wide and large-kernel ones
  take their kernel gradient as one im2col matmul instead.
Measurements: benchmarks/SPEED.md, "CPU policy fields".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from zoo.cpu.buffers import one_buffer
from zoo.cpu.depthwise import Pads, depthwise_conv, shifted_windows
from zoo.cpu.matmul import patchify_conv, pointwise_conv
from zoo.cpu.policy import CpuPolicy, current
from zoo.cpu.winograd import winograd_with_vjp

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def xla_conv(x: jax.Array, kernel: jax.Array, strides, pads: Pads, groups: int = 1):
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=DIMENSIONS, feature_group_count=groups
    )


def _xla_conv(x, kernel, strides, pads, groups, policy):
    return xla_conv(x, kernel, strides, pads, groups)


def _saved_input_forward(x, kernel, strides, pads, groups, policy):
    x = one_buffer(x) if policy.conv_input_buffer else x
    return xla_conv(x, kernel, strides, pads, groups), (x, kernel)


def _xla_backward(strides, pads, groups, policy, residuals, grad):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x, kernel: xla_conv(x, kernel, strides, pads, groups), x, kernel)
    return vjp(grad)


def _im2col_kernel_backward(strides, pads, groups, policy, residuals, grad):
    """Input gradient by XLA (a forward-like convolution); kernel gradient by one matmul of
    the im2col patches (shifted slices) with the output gradient."""
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: xla_conv(x, kernel, strides, pads), x)
    (grad_x,) = input_vjp(grad)
    patches = jnp.concatenate(shifted_windows(x, kernel.shape[:2], strides, pads), axis=-1)
    grad_kernel = jnp.einsum("bhwk,bhwo->ko", patches, grad).reshape(kernel.shape)
    return grad_x, grad_kernel


# XLA's convolution and its gradients, x saved as one buffer for them. strides, pads, groups
# and the policy are static (hashable): nondiff_argnums.
conv_saving_input = jax.custom_vjp(_xla_conv, nondiff_argnums=(2, 3, 4, 5))
conv_saving_input.defvjp(_saved_input_forward, _xla_backward)
# The same, but the kernel gradient as one matmul over im2col patches (groups = 1).
conv_im2col_kernel_gradient = jax.custom_vjp(_xla_conv, nondiff_argnums=(2, 3, 4, 5))
conv_im2col_kernel_gradient.defvjp(_saved_input_forward, _im2col_kernel_backward)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides=(1, 1),
    pads: Pads = ((0, 0), (0, 0)),
    groups: int = 1,
    policy: CpuPolicy | None = None,
) -> jax.Array:
    """NHWC x HWIO 2-D convolution; on CPU by the route for its shape (module doc) under
    `policy` (default: the policy of the trace, `zoo.cpu.current()`)."""
    strides, pads = tuple(strides), tuple(tuple(p) for p in pads)
    policy = policy or current()
    if policy is None:
        return xla_conv(x, kernel, strides, pads, groups)
    kh, kw, cin, cout = kernel.shape
    no_pad = pads == ((0, 0), (0, 0))
    if groups == 1 and (kh, kw) == (1, 1) and no_pad:
        return pointwise_conv(x, kernel, strides, policy)
    if groups == 1 and (kh, kw) == strides and no_pad:
        return patchify_conv(x, kernel)
    if groups == x.shape[-1] == cout and cin == 1:
        return depthwise_conv(x, kernel, strides, pads, policy)
    same_3x3 = (kh, kw) == (3, 3) and strides == (1, 1) and pads == ((1, 1), (1, 1))
    wide_enough = min(cin, cout) >= policy.min_channels_for_winograd
    if policy.winograd and groups == 1 and same_3x3 and wide_enough and x.dtype == jnp.float32:
        return winograd_with_vjp(x, kernel, policy)
    wide = cin >= policy.min_channels_for_im2col_gradient
    large_kernel = kh * kw >= policy.min_taps_for_im2col_gradient
    if policy.ynn_convolutions and groups == 1 and (wide or large_kernel):
        return conv_im2col_kernel_gradient(x, kernel, strides, pads, 1, policy)
    return conv_saving_input(x, kernel, strides, pads, groups, policy)
