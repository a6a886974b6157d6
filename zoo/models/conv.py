"""`Conv`: a drop-in for `flax.linen.Conv` that trains several times faster on CPU.

On CPU (measured on a 2-core Zen3, float32; benchmarks/throughput.py) this module computes
the same function by the fastest route for the shape:

* 1x1 (any stride) and non-overlapping patches (stride = kernel, VALID: ViT/Swin patch
  embedding, ConvNeXt stem/downsampling): a reshape and one matmul (16x16 patch embedding,
  16x224x224x3 -> 384, fwd+bwd: 67 vs 515 ms for XLA's convolution).
* depthwise (groups = input channels = output channels): a sum of k*k shifted
  multiply-adds (elementwise, fuses well; 7x7 16x56x56x96: forward 26 vs 632 ms, fwd+bwd
  0.28 vs 1.69 s for XLA's grouped convolution), with a custom VJP: the input gradient is
  the same sum over the output gradient (dilated by the stride) with the kernel flipped, the
  kernel gradient variadic reductions over up to 13 taps each (convnext_tiny's first stage: 250 ->
  63 ms for a row loop of YNNPACK reductions; train step 2.26 -> 2.37 img/s). JAX's own
  derivative (k*k pads summed, k*k reductions, every shifted slice kept as a residual)
  compiled slowly and ran slower (ConvNeXt's 7x7 at stride 1: fwd+bwd 2.5 vs 4.9 s under
  jaxlib's default flags on a loaded machine; EfficientNet's strided ones: efficientnet_b0
  train step 6.25 -> 7.03 img/s).
  Under YNNPACK's reduce fusions the output is made one buffer (`ONE_BUFFER_DEPTHWISE`), so
  that a following reduction does not take the sum in.
* 3x3 at stride 1 with padding 1 and >= 64 channels in and out, float32 (ResNet's 3x3 layers):
  Winograd's F(2x2, 3x3) (`zoo.models.winograd`), 16 matmuls over transformed 4x4 input
  tiles, with a custom VJP whose input gradient is the same algorithm and whose kernel
  gradient is 16 matmuls too (16x16x128, batch 128, forward + backward: 151 vs 103 ms for
  XLA's convolution).
* everything else: XLA's convolution, provided XLA:CPU runs it itself, with its input kept
  for the backward pass as one buffer (`ONE_BUFFER_CONV_INPUT`). jaxlib's default
  hands convolutions to YNNPACK, whose gradients are slow (3x3, 16x56x56x64: fwd+bwd 499 vs
  121 ms); `zoo.backend` turns that off at import. Where it is still on (`ZOO_XLA_DEFAULTS=0`,
  or the user's own XLA_FLAGS), k x k convolutions with >= 64 input channels or >= 5x5
  kernels use XLA's forward and input gradient with a custom VJP computing the weight
  gradient as im2col patches (shifted slices) @ output gradient.

On GPU/TPU (any backend other than "cpu") it is XLA's native convolution, exactly
`nn.Conv`. Parameters are `kernel` [kh, kw, in / groups, out] (HWIO) and `bias` [out], as in
`nn.Conv`, so converters and checkpoints do not change.

    y = Conv(64, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)(x)

Set `conv.IMPLEMENTATION = "xla"` (before tracing) to force the native convolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from zoo import backend
from zoo.models.winograd import winograd_with_vjp

IMPLEMENTATION = "auto"  # "auto": by backend and shape; "xla": always lax.conv_general_dilated
# With YNNPACK's convolutions (jaxlib's default XLA:CPU flags, module doc) the im2col weight
# gradient pays for wide convolutions and large kernels (the 7x7 ResNet stem: 248 vs 561 ms
# at batch 8, 224px). In a whole narrow network it did not: resnet8 at 28x28, batch 32
# (16-64 channels) trained at 514 img/s with it on every 3x3 conv against 785 img/s with
# XLA's convolution, and at 773 with it only where in_channels >= 64 (idle 2-core Zen3,
# interleaved). Without them XLA's own convolution is faster throughout.
MIN_CHANNELS_FOR_MATMUL_WEIGHT_GRAD = 64
MIN_TAPS_FOR_MATMUL_WEIGHT_GRAD = 25  # 5x5 and larger kernels
DIMENSIONS = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], tuple[int, int]]


def xla_conv(x: jax.Array, kernel: jax.Array, strides, pads: Pads, groups: int = 1):
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=DIMENSIONS, feature_group_count=groups
    )


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


@jax.custom_vjp
def gradient_computed_once(x: jax.Array) -> jax.Array:
    """Identity whose cotangent XLA:CPU computes into one buffer (`backend.one_buffer`, a
    run-time `lax.cond`) instead of fusing its elementwise producers into each consumer and
    recomputing them there (`pointwise_conv`, `zoo.models.layers.block_input`)."""
    return x


def _identity_forward(x):
    return x, None


def _cotangent_through_cond(_, grad):
    return (backend.one_buffer(grad),)


gradient_computed_once.defvjp(_identity_forward, _cotangent_through_cond)


@jax.custom_vjp
def value_computed_once(x: jax.Array) -> jax.Array:
    """x computed into one buffer in the forward pass (`backend.one_buffer`), its gradient
    passed through unchanged: consumers read the buffer instead of recomputing x's producers
    inside their own fusions (`depthwise_conv`, `zoo.models.swin`)."""
    return backend.one_buffer(x)


value_computed_once.defvjp(lambda x: (backend.one_buffer(x), None), lambda _, grad: (grad,))

# The weight gradient of a 1x1 convolution is x^T @ grad over all B*H*W positions. XLA:CPU
# gives it to Eigen with grad transposed, and fused the elementwise work that produces grad
# (BatchNorm's backward, the residual add, the ReLU mask) into that transposing copy, which
# then read every operand column-wise: resnet50's train step at batch 16 spent 1.3 s of its
# 5.7 s in these copies (layer1's four [256, 50176] ones 130-146 ms each; torch's whole
# BatchNorm backward takes 0.45 s). With the output's cotangent computed once into a buffer
# first, the copy is a plain transpose (2-core Zen3, benchmarks/throughput.py's train step,
# variants compiled in one process and run interleaved): resnet50 2.79 -> 3.65 img/s and
# 2.74 -> 3.41 in a second run, efficientnet_b0 10.24 -> 11.33; resnet18-CIFAR and resnet20
# (mostly 3x3) within noise, forward programs unchanged.
ONE_BUFFER_POINTWISE_GRADIENT = True  # False (before tracing): leave the fusion to XLA


def _last_axis_matmul(x, kernel):
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_forward(x, kernel):
    return _last_axis_matmul(x, kernel), (x, kernel)


def _matmul_backward(residuals, grad):
    """grad_x as JAX's; grad_kernel [I, O] = x^T @ grad as a dot YNNPACK takes: the narrower
    of x [rows, I] and grad [rows, O] transposed into a buffer first. For a narrowing layer
    that is grad, so the product is grad^T @ x [O, I], a buffer transposed at the end."""
    x, kernel = residuals
    grad_x = lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
    x, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    if kernel.shape[1] < kernel.shape[0]:
        grad_kernel = backend.one_buffer(backend.transposed_buffer(grad) @ x).T
    else:
        grad_kernel = backend.transposed_buffer(x) @ grad
    return grad_x, grad_kernel.astype(kernel.dtype)


matmul_with_vjp = jax.custom_vjp(_last_axis_matmul)
matmul_with_vjp.defvjp(_matmul_forward, _matmul_backward)

# The kernel gradient of x [rows, I] @ kernel [I, O] is x^T @ grad: both operands contracted
# on their leading (rows) dimension. XLA:CPU hands a dot whose left operand is contracted on
# its leading dimension to Eigen rather than YNNPACK, and Eigen is slow at it. zoo writes the
# narrower operand out transposed (a buffer, so that XLA does not fold the transpose back into
# the dot) and YNNPACK takes the plain product: x^T @ grad for a widening layer (O >= I);
# grad^T @ x for a narrowing one (O < I), whose small [O, I] result is transposed. Alone,
# minimum of 15 runs (2-core Zen4), rows x I -> O: 50176 x 384 -> 96 35.9 -> 25.6 ms, 50176 x
# 256 -> 64 19.5 -> 13.2, 3136 x 1536 -> 384 22.7 -> 18.1, 200704 x 96 -> 16 11.2 -> 6.2
# (narrowing); transposing grad for a widening layer lost (50176 x 96 -> 384 22.8 -> 31.9).
# Train step with and without, both compiled in one process, alternating rounds: narrowing
# layers efficientnet_b0 1.052x per round (6 of 8 rounds faster), resnet50 1.033x (4 of 6),
# convnext_tiny 1.022x (6 of 6), vit_small 1.011x (6 of 6), swin_tiny 1.004x (3 of 5); then
# widening ones too (expanding 1x1 convolutions, MLPs' first layer) efficientnet_b0 1.14x
# (20.70 vs 17.84 img/s, 6 of 6), resnet50 1.057x and 1.060x (6 of 6 twice), convnext_tiny
# 1.06x (6 of 6), swin_tiny 1.037x (5 of 6), vit_small 1.001x and 1.017x (3 and 6 of 6).
MATMUL_WEIGHT_GRAD = True  # False (before tracing): JAX's own gradient everywhere


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., I] @ kernel [I, O]; on CPU with `matmul_with_vjp`'s kernel gradient. Used by
    1x1 convolutions and `nn.Dense(dot_general=dense_dot_general)`."""
    if MATMUL_WEIGHT_GRAD and jax.default_backend() == "cpu":
        return matmul_with_vjp(x, kernel)
    return _last_axis_matmul(x, kernel)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for `nn.Dense(dot_general=...)`: Dense's own contraction (the last
    axis of the input with the kernel's first) goes through `matmul`."""
    dense = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
    if dense and precision is None and preferred_element_type is None:
        return matmul(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


def pointwise_conv(x: jax.Array, kernel: jax.Array, strides) -> jax.Array:
    """1x1 convolution without padding: subsample, then [B, H, W, I] @ [I, O]."""
    x = x[:, :: strides[0], :: strides[1], :]
    y = matmul(x, kernel[0, 0])
    return gradient_computed_once(y) if ONE_BUFFER_POINTWISE_GRADIENT else y


def patchify_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """stride = kernel, no padding: non-overlapping patches [B, h, w, kh*kw*I] @ [kh*kw*I, O]."""
    kh, kw, cin, cout = kernel.shape
    b, height, width, _ = x.shape
    h, w = height // kh, width // kw
    x = x[:, : h * kh, : w * kw].reshape(b, h, kh, w, kw, cin).transpose(0, 1, 3, 2, 4, 5)
    return jnp.einsum("bhwk,ko->bhwo", x.reshape(b, h, w, -1), kernel.reshape(-1, cout))


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


def _depthwise_forward(x, kernel, strides, pads):
    return shifted_depthwise(x, kernel, strides, pads), (x, kernel)


def _sums(terms: list[jax.Array], axes: tuple[int, ...]) -> list[jax.Array]:
    """`[jnp.sum(t, axes) for t in terms]` as one variadic reduction: XLA:CPU runs it in its own
    loop, which reads the operands once for all terms and fuses elementwise producers
    (strided slices) into it. YNNPACK takes single reductions only, and needs each term, a
    slice among them, as a buffer."""
    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    return list(lax.reduce(tuple(terms), zeros, lambda a, b: tuple(map(jnp.add, a, b)), axes))


def _depthwise_backward(strides, pads, residuals, grad):
    """Input gradient: the same depthwise sum over the output gradient (dilated by the
    stride) with the kernel flipped, padded by kh-1-p (a crop where negative) and by the
    input rows and columns no window reached;
    kernel gradient: per tap, the sum over (B, H, W) of input window x output gradient, up to
    `TAPS_PER_REDUCTION` taps in one variadic reduction per example (`_sums`), then summed
    over the batch."""
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
    if DEPTHWISE_GRAD_FROM_SPREAD and min(low_h, low_w) >= 0:
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
    step = TAPS_PER_REDUCTION
    groups = [products[start : start + step] for start in range(0, len(products), step)]
    per_example = jnp.stack([total for group in groups for total in _sums(group, (1, 2))])
    grad_kernel = per_example.sum(1).reshape(kh, kw, 1, -1)
    return grad_x, grad_kernel.astype(kernel.dtype)


# The kernel gradient reads the output gradient once per variadic reduction (two for a 5x5
# kernel), and XLA:CPU fused the gradient's producer (the following BatchNorm's backward) into
# each; the input gradient's spread (dilated, padded) gradient is computed into a buffer, so
# the reductions read the gradient back out of it. Train step per round against without
# (2-core Zen5, 8 rounds): efficientnet_b0 1.06x and 1.11x; convnext_tiny 0.95x and 1.00x
# (its gradient comes from LayerNorm's hand-written backward, already a buffer).
DEPTHWISE_GRAD_FROM_SPREAD = True  # False (before tracing): the reductions read grad itself

# The kernel gradient's variadic reductions take at most 13 taps each: one reduction of all 49
# products of a 7x7 kernel ran slower than four of 12-13 (alone, at convnext_tiny's stage
# shapes at batch 16: 56x56x96 33-37 -> 28-32 ms, 28x28x192 17 -> 13, 14x14x384 10.2 -> 6.0,
# 7x7x768 14.1 -> 4.9), 5x5 kernels within 10% either way. Train step per round:
# convnext_tiny 1.008x (5 of 6) and 1.019x (8 of 10); efficientnet_b0 0.979x (2 of 6), then
# 1.020x (7 of 10).
TAPS_PER_REDUCTION = 13  # 49 (before tracing): a 7x7 kernel's taps in one reduction

# Depthwise with a hand-written VJP: JAX's own derivative of the k*k shifted slices keeps
# every slice as a residual and is k*k pads summed (input gradient) and k*k separate
# reductions (kernel gradient). strides and pads are static (hashable tuples).
depthwise_with_vjp = jax.custom_vjp(shifted_depthwise, nondiff_argnums=(2, 3))
depthwise_with_vjp.defvjp(_depthwise_forward, _depthwise_backward)
DEPTHWISE_VJP = True  # False (before tracing): JAX differentiates the shifted sum itself


# With YNNPACK's "reduce" fusions on (zoo's training setting, see zoo.backend), the reduction
# after a depthwise convolution (ConvNeXt's LayerNorm) takes the k*k shifted multiply-adds in
# as its producer, and YNNPACK needs every operand as a buffer: 49 shifted copies of the input
# and 49 broadcast kernel taps, each [B, H, W, C], per block (convnext_tiny, batch 16: 2.0 s
# of the 7.5 s train step in the depthwise forward, 0.23 s with the output as one buffer;
# train step 1.99 -> 2.23 img/s, interleaved in one process; efficientnet_b0 6.0 vs 6.1).
# Keyed on the process flag, so forward-only programs compiled without YNNPACK reductions
# (backend.forward_compiler_options) get it too: convnext_tiny inference 9.1 -> 10.6 img/s.
ONE_BUFFER_DEPTHWISE = True  # False (before tracing): leave the fusion to XLA


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides, pads: Pads) -> jax.Array:
    """Depthwise convolution as a sum of shifted multiply-adds; kernel [kh, kw, 1, C]."""
    if DEPTHWISE_VJP:
        out = depthwise_with_vjp(x, kernel, tuple(strides), pads)
    else:
        out = shifted_depthwise(x, kernel, strides, pads)
    if ONE_BUFFER_DEPTHWISE and "reduce" in backend.ynn_fusion_types():
        out = value_computed_once(out)
    return out


# The weight gradient of XLA:CPU's own convolution reads x transposed ([C, H, W, B]: the batch
# is the contracted dimension). XLA builds that transposed copy as a fusion and pulled x's
# elementwise producers into it (BatchNorm, ReLU, and the residual adds reaching back through
# up to three blocks in resnet18), recomputing them while reading each operand with a stride of
# C: resnet18-CIFAR's train step at batch 128 spent 1.3 s of its 3.4 s in these copies, the
# largest 245 ms, which from a buffer takes 17 ms. So the convolution keeps x for its backward
# pass as one buffer (`backend.one_buffer`), and its forward pass reads that buffer; inference,
# which is not differentiated, is untouched. The train step, both variants compiled in one
# process and timed in 10 alternating rounds (2-core Zen4): resnet18-CIFAR at batch 128
# 35.9 -> 45.2 img/s, resnet20 223 -> 317, resnet50 and efficientnet_b0 unchanged (1.02x,
# 0.99x per round: their wide layers are 1x1 matmuls, `pointwise_conv`).
ONE_BUFFER_CONV_INPUT = True  # False (before tracing): leave the fusion to XLA


def _saved_input_forward(x, kernel, strides, pads, groups):
    x = backend.one_buffer(x) if ONE_BUFFER_CONV_INPUT else x
    return xla_conv(x, kernel, strides, pads, groups), (x, kernel)


def _xla_backward(strides, pads, groups, residuals, grad):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x, kernel: xla_conv(x, kernel, strides, pads, groups), x, kernel)
    return vjp(grad)


def _matmul_weight_backward(strides, pads, groups, residuals, grad):
    """Input gradient by XLA (a forward-like conv, fast); weight gradient by matmul."""
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: xla_conv(x, kernel, strides, pads), x)
    (grad_x,) = input_vjp(grad)
    patches = jnp.concatenate(shifted_windows(x, kernel.shape[:2], strides, pads), axis=-1)
    grad_kernel = jnp.einsum("bhwk,bhwo->ko", patches, grad).reshape(kernel.shape)
    return grad_x, grad_kernel


# XLA's convolution and its gradients, x saved as one buffer for them (above). strides, pads
# and groups are static (hashable): nondiff_argnums.
conv_saving_input = jax.custom_vjp(xla_conv, nondiff_argnums=(2, 3, 4))
conv_saving_input.defvjp(_saved_input_forward, _xla_backward)
# The same, but the weight gradient as one matmul over im2col patches (groups = 1).
conv_matmul_weight_grad = jax.custom_vjp(xla_conv, nondiff_argnums=(2, 3, 4))
conv_matmul_weight_grad.defvjp(_saved_input_forward, _matmul_weight_backward)


# 3x3 convolutions at stride 1 with >= 64 input and output channels go through Winograd.
# Forward + both gradients against XLA's own convolution, batch 128 (2-core Zen4, minimum of
# 8): 32x32x64 183 -> 156 ms, 16x16x128 151 -> 103, 8x8x256 146 -> 80, 4x4x512 143 -> 73
# (torch/oneDNN: 147, 131, -, 114). The kernel transforms are adds, not einsums with G (at
# 4x4x512 an einsum took 20 ms against 2.5). Whole models against XLA's convolution, both
# compiled in one process, 6 alternating rounds (per-round ratio, timm in the same rounds):
# resnet18-CIFAR training at batch 128 45.7 -> 53.1 img/s (1.22x; timm 56.9), inference at
# 256 165 -> 210 (1.30x; timm 187); resnet50 training at 16 5.40 -> 6.12 (1.13x; timm 5.80),
# inference at 64 20.3 -> 22.7 (1.11x; timm 18.4); the default job (resnet8) 92.6 -> 85.0 s.
# Narrower layers lost: resnet20 with its 16- and 32-channel convolutions through it too
# trained at 279 instead of 341 img/s (matmuls with K = 16 and 32). Costs: compiling takes
# longer (16 matmuls and their transforms per convolution: resnet18-CIFAR's train step 3.8 ->
# 15.8 s, resnet50's 7.8 -> 20.1 s, its forward 1.1 -> 4.5 s; one [16, tiles, I] batched
# matmul compiled no faster and ran 1.2-1.6x slower), and F(4x4, 3x3) was no faster here (its
# transforms cost more) and 10-30x less exact.
# Memory: the transformed planes are 4x the input (and output); the gradient program's
# temporaries (XLA's memory_analysis) resnet50 at batch 16 2.08 -> 2.34 GB, resnet18-CIFAR at
# 128 1.00 -> 1.75 GB.
WINOGRAD = True  # False (before tracing): XLA's own convolution for 3x3 at stride 1
MIN_CHANNELS_FOR_WINOGRAD = 64


def conv2d(
    x: jax.Array, kernel: jax.Array, strides=(1, 1), pads: Pads = ((0, 0), (0, 0)), groups=1
) -> jax.Array:
    """NHWC x HWIO 2-D convolution, computed as fast as this backend allows (module doc)."""
    strides, pads = tuple(strides), tuple(tuple(p) for p in pads)
    kh, kw, cin, cout = kernel.shape
    if IMPLEMENTATION == "xla" or jax.default_backend() != "cpu":
        return xla_conv(x, kernel, strides, pads, groups)
    no_pad = pads == ((0, 0), (0, 0))
    if groups == 1 and (kh, kw) == (1, 1) and no_pad:
        return pointwise_conv(x, kernel, strides)
    if groups == 1 and (kh, kw) == strides and no_pad:
        return patchify_conv(x, kernel)
    if groups == x.shape[-1] == cout and cin == 1:
        return depthwise_conv(x, kernel, strides, pads)
    same_3x3 = (kh, kw) == (3, 3) and strides == (1, 1) and pads == ((1, 1), (1, 1))
    wide_enough = min(cin, cout) >= MIN_CHANNELS_FOR_WINOGRAD
    if WINOGRAD and groups == 1 and same_3x3 and wide_enough and x.dtype == jnp.float32:
        return winograd_with_vjp(x, kernel)
    wide = cin >= MIN_CHANNELS_FOR_MATMUL_WEIGHT_GRAD
    large_kernel = kh * kw >= MIN_TAPS_FOR_MATMUL_WEIGHT_GRAD
    if backend.ynn_convolutions() and groups == 1 and (wide or large_kernel):
        return conv_matmul_weight_grad(x, kernel, strides, pads, 1)
    return conv_saving_input(x, kernel, strides, pads, groups)


class Conv(nn.Module):
    """2-D convolution on NHWC inputs; the parameters and results of `nn.Conv`.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: "SAME", "VALID", an int, or ((top, bottom), (left, right)).
      feature_group_count: groups (= input channels for a depthwise convolution).
      use_bias: add a learned `bias` [features].
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = tuple(self.kernel_size)
        strides = tuple(self.strides) if self.strides is not None else (1, 1)
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*kernel_size, in_features // self.feature_group_count, self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        pads = self.explicit_pads(x.shape[1:3], kernel_size, strides)
        y = conv2d(x, kernel, strides, pads, self.feature_group_count)
        return y if bias is None else y + bias

    def explicit_pads(self, spatial, kernel_size, strides) -> Pads:
        padding = self.padding
        if isinstance(padding, int):
            return ((padding, padding), (padding, padding))
        if isinstance(padding, str):
            return tuple(lax.padtype_to_pads(spatial, kernel_size, strides, padding))
        return tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)
