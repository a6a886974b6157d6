"""Depthwise convolution (groups = channels) as a sum of k*k shifted multiply-adds, with a
hand-written gradient.

XLA:CPU's grouped convolution runs depthwise kernels far below its dense speed; shifted
multiply-adds are elementwise and fuse well. JAX's own derivative of the shifted sum keeps
every slice as a residual and is k*k pads summed and k*k reductions, slow to compile and to
run; the hand-written one (`CpuPolicy.depthwise_vjp`) is the same shifted sum over the
stride-dilated output gradient with the kernel flipped (input gradient) and variadic
reductions over up to `depthwise_taps_per_reduction` taps (kernel gradient). Measurements:
benchmarks/SPEED.md, "CPU policy fields".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from zoo.cpu.buffers import value_computed_once
from zoo.cpu.policy import CpuPolicy

Pads = tuple[tuple[int, int], tuple[int, int]]


def shifted_windows(
    x: jax.Array, kernel_size, strides, pads: Pads, pad_value: float = 0.0
) -> list[jax.Array]:
    """The kh*kw strided slices of padded x, one per kernel tap (row-major): [B, Ho, Wo, C]."""
    (kh, kw), (sh, sw) = kernel_size, strides
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=pad_value)
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    return [
        x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]


def shifted_depthwise(x: jax.Array, kernel: jax.Array, strides, pads: Pads) -> jax.Array:
    """Depthwise convolution as a sum of shifted multiply-adds; kernel [kh, kw, 1, C].
    Accumulated in float32 at least and returned in x's dtype, as XLA's convolution does: with
    each add rounded to bf16, bf16 EfficientNets drifted from float32 further than with XLA's."""
    kh, kw = kernel.shape[:2]
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    taps = [tap.astype(accumulate) for tap in shifted_windows(x, (kh, kw), strides, pads)]
    kernel = kernel.astype(accumulate)
    out = taps[0] * kernel[0, 0, 0]
    for index in range(1, kh * kw):
        out = out + taps[index] * kernel[index // kw, index % kw, 0]
    return out.astype(x.dtype)


def _depthwise(x, kernel, strides, pads, policy):
    return shifted_depthwise(x, kernel, strides, pads)


def _depthwise_forward(x, kernel, strides, pads, policy):
    return shifted_depthwise(x, kernel, strides, pads), (x, kernel)


def _sums(terms: list[jax.Array], axes: tuple[int, ...]) -> list[jax.Array]:
    """`[jnp.sum(t, axes) for t in terms]` as one variadic reduction: XLA:CPU runs it in its own
    loop, which reads the operands once for all terms and fuses elementwise producers
    (strided slices) into it. YNNPACK takes single reductions only, and needs each term, a
    slice among them, as a buffer."""
    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    return list(lax.reduce(tuple(terms), zeros, lambda a, b: tuple(map(jnp.add, a, b)), axes))


def _depthwise_backward(strides, pads, policy, residuals, grad):
    """Input gradient: the same depthwise sum over the output gradient (dilated by the
    stride) with the kernel flipped, padded by kh-1-p (a crop where negative) and by the
    input rows and columns no window reached; kernel gradient: per tap, the sum over
    (B, H, W) of input window x output gradient, up to `depthwise_taps_per_reduction` taps
    in one variadic reduction per example (`_sums`), then summed over the batch."""
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    (sh, sw), ((top, bottom), (left, right)) = strides, pads
    out_h, out_w = grad.shape[1:3]
    padded_h, padded_w = x.shape[1] + top + bottom, x.shape[2] + left + right
    missed_h = padded_h - (out_h - 1) * sh - kh  # rows no window reached (< stride)
    missed_w = padded_w - (out_w - 1) * sw - kw
    grad = grad.astype(x.dtype)
    spread = lax.pad(  # [B, H + kh - 1, W + kw - 1, C]: dilated, padded (or cropped)
        grad,
        jnp.zeros((), grad.dtype),
        (
            (0, 0, 0),
            (kh - 1 - top, kh - 1 + missed_h - bottom, sh - 1),
            (kw - 1 - left, kw - 1 + missed_w - right, sw - 1),
            (0, 0, 0),
        ),
    )
    grad_x = shifted_depthwise(spread, kernel[::-1, ::-1], (1, 1), ((0, 0), (0, 0)))
    low_h, low_w = kh - 1 - top, kw - 1 - left
    if policy.depthwise_gradient_from_spread and min(low_h, low_w) >= 0:
        # grad again, read from the spread buffer (XLA:CPU computes the padded gradient into
        # one buffer) rather than recomputed from its producers inside each reduction
        rows = slice(low_h, low_h + sh * (out_h - 1) + 1, sh)
        grad = spread[:, rows, low_w : low_w + sw * (out_w - 1) + 1 : sw]
    # Summed in float32 at least: bf16 sums over B x H x W lost most of the kernel gradient's
    # digits (8x56x56x32, 3x3: 8% off float32's, 0.3% so).
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    grad = grad.astype(accumulate)
    products = [
        tap.astype(accumulate) * grad for tap in shifted_windows(x, (kh, kw), strides, pads)
    ]
    step = policy.depthwise_taps_per_reduction
    groups = [products[start : start + step] for start in range(0, len(products), step)]
    per_example = jnp.stack([total for group in groups for total in _sums(group, (1, 2))])
    grad_kernel = per_example.sum(1).reshape(kh, kw, 1, -1)
    return grad_x, grad_kernel.astype(kernel.dtype)


# strides, pads and the policy are static (hashable): nondiff_argnums.
depthwise_with_vjp = jax.custom_vjp(_depthwise, nondiff_argnums=(2, 3, 4))
depthwise_with_vjp.defvjp(_depthwise_forward, _depthwise_backward)


def depthwise_conv(
    x: jax.Array, kernel: jax.Array, strides, pads: Pads, policy: CpuPolicy
) -> jax.Array:
    """Depthwise convolution as a sum of shifted multiply-adds; kernel [kh, kw, 1, C]. Under
    YNNPACK's reductions its output is one buffer (`CpuPolicy.depthwise_output_buffer`): a
    following reduction (ConvNeXt's LayerNorm) took the k*k multiply-adds in and needed each
    shifted copy of the input as a buffer."""
    if policy.depthwise_vjp:
        out = depthwise_with_vjp(x, kernel, tuple(strides), pads, policy)
    else:
        out = shifted_depthwise(x, kernel, strides, pads)
    if policy.depthwise_output_buffer and policy.ynn_reductions:
        out = value_computed_once(out)
    return out
