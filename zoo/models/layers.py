"""Blocks shared by model families."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zoo import backend, parallel
from zoo.models.conv import Conv, dense_dot_general, gradient_computed_once, shifted_windows

MATERIALIZE_BLOCK_GRADIENTS = True  # False (before tracing): `block_input` is a plain identity


def block_input(x: jax.Array) -> jax.Array:
    """Identity; put on a residual block's input so that XLA:CPU computes the gradient of the
    residual stream once per block.

    Without it XLA:CPU fuses the elementwise part of that gradient (the residual adds and the
    LayerNorm backward of every later block) into each consumer, e.g. the transposing copy
    that feeds a weight-gradient matmul, and recomputes it there. Routing the cotangent
    through `zoo.backend.one_buffer` (a run-time `lax.cond`) makes it one buffer. Gradient
    of the loss, batch 16, 2-core Zen3: vit_small with 8 blocks 4.9 -> 3.4 s; zoo's train
    step against timm's, interleaved in one process
    (benchmarks/throughput.py --vs-timm): vit_small 0.44x -> 0.82x. Used by ViT and Swin
    blocks: swin_tiny's train step with it and without, compiled in one process and run
    interleaved with timm's, 2.13 vs 1.87 img/s (timm 3.58). ConvNeXt (2.17 vs 2.22 img/s),
    ResNet and EfficientNet (resnet50 2.58 vs 2.58, efficientnet_b0 6.25 vs 6.66) gained
    nothing, so they do without (their 1x1 convolutions compute their output's gradient
    once instead: `zoo.models.conv.pointwise_conv`). Values and gradients equal the
    identity's to float32 round-off (XLA rounds the two programs differently). On other
    backends (no such recomputation there, and a conditional costs a host round trip on GPU)
    it is a no-op.
    """
    if not MATERIALIZE_BLOCK_GRADIENTS or jax.default_backend() != "cpu":
        return x
    return gradient_computed_once(x)


def per_example_mask(
    rng: jax.Array, keep: float, shape: tuple[int, ...], axis_name: str | None
) -> jax.Array:
    """Bernoulli(keep) mask of `shape` whose row i (axis 0) is drawn from its own key,
    `fold_in(rng, global index of row i)` (`zoo.parallel.example_keys`): under `pmap` each
    device draws the rows of its slice of the global batch, so jit, pmap and one device mask
    an example alike. Axis 0 is the batch, or each example's rows in order, the same number
    for every example (Swin's windows, [B * windows, ...]): a row's global index is then the
    same either way too."""
    keys = parallel.example_keys(rng, shape[0], axis_name)
    return jax.vmap(lambda key: jax.random.bernoulli(key, keep, shape[1:]))(keys)


class Dropout(nn.Module):
    """Dropout (Srivastava et al. 2014) with a mask drawn per example (`per_example_mask`),
    so that it does not depend on how the batch is split over devices. Kept values are
    scaled by 1 / (1 - rate). Uses the 'dropout' rng stream.

    Attributes:
      rate: probability of zeroing a value.
      axis_name: the `pmap` axis the batch is split over (the global example index keys the
        mask); None under `jit` or on one device, where arrays hold the whole batch.
    """

    rate: float = 0.0
    axis_name: str | None = None

    def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
        return x.shape  # one decision per value

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        mask = per_example_mask(self.make_rng("dropout"), keep, self.mask_shape(x), self.axis_name)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class DropPath(Dropout):
    """Stochastic depth (Huang et al. 2016): `Dropout` of the whole residual branch per
    example (one decision per example, `rate` the probability of dropping it)."""

    def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
        return (x.shape[0],) + (1,) * (x.ndim - 1)


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


def _hand_written_applies(norm: nn.Module, x: jax.Array, mask) -> bool:
    """What `BatchNorm` and `LayerNorm` need for their hand-written gradient: applied (not
    initialised) on CPU, float32 throughout, scale and bias, no mask, no cross-device
    statistics. Otherwise they are flax's own."""
    return not (
        norm.is_initializing()
        or jax.default_backend() != "cpu"
        or mask is not None
        or norm.axis_name is not None
        or not (norm.use_scale and norm.use_bias)
        or {x.dtype, jnp.dtype(norm.param_dtype), jnp.dtype(norm.dtype or x.dtype)}
        != {jnp.dtype(jnp.float32)}
    )


# epsilon is static: nondiff_argnums.
batch_norm_train = jax.custom_vjp(
    lambda x, scale, bias, epsilon: _batch_norm_forward(x, scale, bias, epsilon)[0],
    nondiff_argnums=(3,),
)
batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` (same parameters, statistics and results) whose training-mode gradient
    is written by hand on CPU (`batch_norm_train`): JAX's derivative of flax's normalisation
    reached XLA:CPU as more reductions and elementwise passes than the two reductions and one
    pass the textbook gradient needs. Alone, fwd+bwd with a ReLU (2-core Zen4): 16x112x112x32
    13.3 -> 10.1 ms, 16x56x56x256 32.4 -> 22.5 ms. Train step with a prototype of this code
    and without, both compiled in one process, 10 alternating rounds: efficientnet_b0
    16.43 -> 16.73 img/s, resnet50 5.17 -> 5.28, resnet18-CIFAR 47.3 -> 48.1 (8 rounds):
    small, in every model the same way. Elsewhere
    (evaluation, other backends or dtypes, cross-device statistics under pmap, masks, other
    axes) it is flax's own.
    """

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        running = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        plain = (
            running
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
LAYER_NORM_VJP = True  # False (before tracing): `LayerNorm` is flax's everywhere


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters and results) whose gradient, over the last axis, is
    written by hand on CPU (`layer_norm_with_vjp`): per token two sums over the features and
    one elementwise pass; two sums over the tokens for scale and bias. JAX's derivative of
    flax's normalisation reached XLA:CPU as YNNPACK reductions, which take each operand as a
    buffer: the scale broadcast to the full feature map (convnext_tiny's first stage:
    [16, 56, 56, 96]) and per-token statistics were written out for each block. Train step
    with it and without, both compiled in one process, alternating rounds (2-core Zen4):
    convnext_tiny 1.016x per round (4 of 6 rounds faster), vit_small 1.014x (4 of 6),
    swin_tiny 1.015x (4 of 5); inference 1.02x and 1.01x (the same computation). Alone, with
    a matmul after it, 16x56x56x96: 38.0 -> 35.1 ms. Elsewhere (other backends or dtypes,
    masks, cross-device statistics, other axes, the fast variance) it is flax's own.
    """

    @nn.compact
    def __call__(self, x, *, mask=None):
        last_axis = (-1, x.ndim - 1, (-1,), (x.ndim - 1,))
        plain = (
            not LAYER_NORM_VJP
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


def global_avg_pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C], accumulated in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


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


# window, strides and pads are static (hashable tuples).
window_max = jax.custom_vjp(_window_max, nondiff_argnums=(1, 2, 3))
window_max.defvjp(_window_max_forward, _window_max_backward)


def max_pool(x: jax.Array, window=(3, 3), strides=(2, 2), pads=((1, 1), (1, 1))) -> jax.Array:
    """`nn.max_pool` on NHWC x with explicit pads; the same values and gradients.

    On CPU an elementwise maximum over the shifted windows with a hand-written backward.
    JAX differentiates `lax.reduce_window`'s max through a variadic reduce-window that
    carries the arg-max along, which XLA:CPU ran slowly: ResNet's stem pool (3x3/2,
    16x112x112x64) forward and backward took 106 ms, 22 ms this way (forward alone 7.4 vs
    5.9 ms; PyTorch channels-last 9.7 ms).
    """
    window, strides = tuple(window), tuple(strides)
    pads = tuple(tuple(p) for p in pads)
    if jax.default_backend() != "cpu":
        return nn.max_pool(x, window, strides=strides, padding=pads)
    return window_max(x, window, strides, pads)


_SQRT_HALF = 0.5**0.5  # a Python float: keeps x's dtype


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the exact erf form, as torch's `nn.GELU()` (flax's default is the tanh fit):
    x * (1 + erf(x / sqrt 2)) / 2, torch's own formula.

    `nn.gelu(x, approximate=False)` computes the same with `erfc`, which XLA:CPU expands into
    several fusions (an exp and range selects), slower than `erf`'s polynomial (1.1 s of
    convnext_tiny's train step): its train step 2.04 -> 2.40 img/s, vit_small 2.95 -> 3.10
    (batch 16, 2-core Zen3, both compiled in one process and run interleaved). The two
    differ by < 1e-6.
    """
    return x * 0.5 * (1.0 + lax.erf(x * _SQRT_HALF))


class Mlp(nn.Module):
    """Two dense layers with an activation between them (the transformer/ConvNeXt MLP).

    Submodules `fc1`/`fc2` are named after timm's `Mlp`. Acts on the last axis, so it serves
    tokens [B, N, C] and channels-last feature maps [B, H, W, C] alike. `axis_name`: the
    `pmap` axis of the batch, for per-example dropout masks (`Dropout`).
    """

    hidden_features: int
    out_features: int | None = None
    act: Callable[[jax.Array], jax.Array] = gelu_exact
    drop_rate: float = 0.0
    kernel_init: Callable = nn.initializers.truncated_normal(0.02)
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        out_features = self.out_features or x.shape[-1]
        kw["dot_general"] = dense_dot_general  # the kernel gradient through YNNPACK (conv.matmul)
        x = self.act(nn.Dense(self.hidden_features, name="fc1", **kw)(x))
        x = Dropout(self.drop_rate, self.axis_name)(x, train=train)
        x = nn.Dense(out_features, name="fc2", **kw)(x)
        return Dropout(self.drop_rate, self.axis_name)(x, train=train)


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (Touvron et al. 2021, CaiT).

    The parameter is `gamma` [C], as in timm, initialised to `init_value`.
    """

    init_value: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param(
            "gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), self.param_dtype
        )
        return x * gamma.astype(x.dtype)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) on a channels-last feature map.

    Global average pool -> `conv_reduce` -> act -> `conv_expand` -> sigmoid gate on the
    channels. The two 1x1 convolutions act on a pooled vector, so they are dense layers here
    (timm's names kept, kernels [in, out]).
    """

    reduced_features: int
    act: Callable[[jax.Array], jax.Array] = nn.relu
    gate: Callable[[jax.Array], jax.Array] = nn.sigmoid
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
        s = global_avg_pool(x)  # [B, C]
        s = self.act(nn.Dense(self.reduced_features, name="conv_reduce", **kw)(s))
        s = nn.Dense(x.shape[-1], name="conv_expand", **kw)(s)
        return x * self.gate(s)[:, None, None, :].astype(x.dtype)


# --------------------------------------------------------------------------- transformer blocks
# Shared by ViT/DeiT, Swin and ConvNeXt. Submodule names follow timm's state_dict keys
# (`qkv`, `proj`) so that converters are a rename plus layout transposes.

# timm initialises the Linears of its transformers with `trunc_normal_(std=.02)`, whose cut-off
# is at +-2 in absolute value, i.e. 100 standard deviations: a plain normal(0.02), zero bias.
dense_init = nn.initializers.normal(stddev=0.02)


def layer_norm(epsilon: float = 1e-6, dtype: Any = jnp.float32, **kw) -> nn.LayerNorm:
    """torch-equivalent LayerNorm: two-pass variance (flax's default fast variance,
    E[x^2] - E[x]^2, loses digits on large activations and breaks 1e-4 parity with timm)."""
    return LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=False, **kw)


def relative_position_index(window: tuple[int, int], table_side: int) -> np.ndarray:
    """[N, N] index into a (table_side x table_side) relative-position table for the tokens
    of an (h, w) window, N = h * w: row-major offset (dy, dx) -> (dy + c) * side + dx + c."""
    centre = table_side // 2
    ys, xs = np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing="ij")
    coords = np.stack([ys.reshape(-1), xs.reshape(-1)])  # [2, N]
    offset = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
    return (offset[0] + centre) * table_side + offset[1] + centre


class _HeadsDense(nn.Module):
    """A dense layer stored as `nn.Dense`'s `kernel` [in, out] / `bias` [out], applied with an
    einsum over a reshaped view of the kernel: `spec` is the einsum, `kernel_shape` the view,
    `bias_shape` the bias's broadcast shape. Lets the attention projections read and write the
    heads-major [B, heads, N, head_dim] layout directly instead of a separate transpose."""

    features: int
    spec: str
    kernel_shape: tuple[int, ...]
    bias_shape: tuple[int, ...]
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            dense_init,
            (int(np.prod(self.kernel_shape)) // self.features, self.features),
            self.param_dtype,
        )
        out = jnp.einsum(
            self.spec, x.astype(self.dtype), kernel.reshape(self.kernel_shape).astype(self.dtype)
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            out = out + bias.reshape(self.bias_shape).astype(self.dtype)
        return out


def attention_weights(q: jax.Array, k: jax.Array, biases=()) -> jax.Array:
    """softmax(q k^T + sum(biases)) over the last axis, in float32: q, k [B, heads, N, d]."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    for bias in biases:
        logits = logits + bias
    return jax.nn.softmax(logits, axis=-1)


def _attention(q, k, v, biases):
    weights = attention_weights(q, k, biases)
    return jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v), weights


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The cotangent of a broadcast to x.shape from `shape`: x summed over broadcast axes."""
    x = x.sum(tuple(range(x.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axes, keepdims=True)


def _attention_backward(residuals, grad):
    q, k, v, weights, biases = residuals
    grad_v = jnp.einsum("bhkq,bhqd->bhkd", backend.transposed_buffer(weights).astype(v.dtype), grad)
    grad_weights = jnp.einsum("bhqd,bhkd->bhqk", grad, v).astype(jnp.float32)
    grad_logits = weights * (grad_weights - jnp.sum(grad_weights * weights, -1, keepdims=True))
    grad_q = jnp.einsum("bhqk,bhkd->bhqd", grad_logits.astype(k.dtype), k)
    grad_k = jnp.einsum(
        "bhkq,bhqd->bhkd", backend.transposed_buffer(grad_logits).astype(q.dtype), q
    )
    grad_biases = tuple(_sum_to_shape(grad_logits, b.shape).astype(b.dtype) for b in biases)
    return grad_q, grad_k, grad_v, grad_biases


def _slices(q: jax.Array, most: int) -> list[slice]:
    """Up to `most` equal slices of the batch, each with at least `MIN_SLICE_FLOPS` in its
    q k^T. One slice, the whole batch, for small work, and when the process has more than one
    device: a batch sharded over devices (`jax.jit` over a mesh) would be cut across shards,
    and XLA moved the slices between devices (collective-permutes and all-to-alls)."""
    batch, heads, tokens, head_dim = q.shape
    flops = 2 * batch * heads * tokens * tokens * head_dim
    most = max(1, min(most, batch, flops // MIN_SLICE_FLOPS))
    if jax.device_count() > 1:
        most = 1
    size = batch // max(n for n in range(1, most + 1) if batch % n == 0)
    return [slice(start, start + size) for start in range(0, batch, size)]


def _has_batch_axis(bias: jax.Array, batch: int) -> bool:
    return bias.ndim == 4 and bias.shape[0] == batch


def _sliced(biases, part: slice, batch: int) -> tuple:
    """The biases for one slice of the batch: a bias with a batch axis is sliced too."""
    return tuple(b[part] if _has_batch_axis(b, batch) else b for b in biases)


def _attention_in_slices(q, k, v, biases):
    parts = _slices(q, ATTENTION_SLICES)
    if len(parts) == 1:
        return _attention(q, k, v, biases)[0]
    batch = q.shape[0]
    return jnp.concatenate(
        [_attention(q[p], k[p], v[p], _sliced(biases, p, batch))[0] for p in parts]
    )


def _attention_backward_in_slices(residuals, grad):
    q, k, v, weights, biases = residuals
    tokens = q.shape[2]
    parts = _slices(q, ATTENTION_GRAD_SLICES if tokens >= MIN_TOKENS_FOR_GRAD_SLICES else 1)
    if len(parts) == 1:
        return _attention_backward(residuals, grad)
    batch = q.shape[0]
    grads = [
        _attention_backward((q[p], k[p], v[p], weights[p], _sliced(biases, p, batch)), grad[p])
        for p in parts
    ]
    grad_q, grad_k, grad_v = (jnp.concatenate([g[i] for g in grads]) for i in range(3))
    grad_biases = []
    for i, b in enumerate(biases):  # a bias with a batch axis was sliced; others were shared
        pieces = [g[3][i] for g in grads]
        grad_biases.append(jnp.concatenate(pieces) if _has_batch_axis(b, batch) else sum(pieces))
    return grad_q, grad_k, grad_v, tuple(grad_biases)


def _qkv_attention(qkv, scale, biases):
    return _attention_in_slices(qkv[0] * scale, qkv[1], qkv[2], biases)


def _qkv_attention_forward(qkv, scale, biases):
    q = qkv[0] * scale
    out, weights = _attention(q, qkv[1], qkv[2], biases)
    return out, (q, qkv[1], qkv[2], weights, biases)


def _qkv_attention_backward(scale, residuals, grad):
    """The gradient of the stacked qkv as one stack of the three (with q's scale), rather than
    JAX's three zero-padded copies of qkv's shape summed (the cotangents of qkv[0], qkv[1],
    qkv[2])."""
    grad_q, grad_k, grad_v, grad_biases = _attention_backward_in_slices(residuals, grad)
    return jnp.stack([grad_q * scale, grad_k, grad_v]), grad_biases


_attention_with_vjp = jax.custom_vjp(_qkv_attention, nondiff_argnums=(1,))
_attention_with_vjp.defvjp(_qkv_attention_forward, _qkv_attention_backward)
# XLA:CPU computes the gradients P^T dO (values) and dS^T Q (keys) of JAX's own derivative as
# batched matmuls whose left operand is transposed, which YNNPACK refuses; Eigen runs them at
# a few GFLOP/s at window shapes (swin_tiny's first stage, [1024 x 3] 49x49 @ 49x32: 112 ms
# for 0.47 GFLOP). Train step, both variants compiled in one process and run interleaved:
# swin_tiny 2.77 -> 2.82 and 2.81 -> 2.94 img/s; vit_small 3.36 -> 3.49 and 3.72 -> 3.60
# (noise). It takes the qkv projection's output whole and returns its gradient as one stack
# (`_qkv_attention_backward`): attention forward + backward alone, vit_small at batch 16
# 33.8 -> 30.1 ms, swin_tiny's first stage 65.0 -> 53.8 ms; train step per round 1.016x
# (vit_small, 6 of 8 rounds) and 1.011x (swin_tiny, 5 of 8).
ATTENTION_VJP = True  # False (before tracing): JAX differentiates the attention itself
# XLA:CPU hands each batched matmul of attention to YNNPACK, which runs the batch elements one
# after another, each (197 x 197 at vit_small, 49 x 49 in Swin's windows) as one tile: one
# core. XLA's thunk executor runs independent operations side by side only once more than 8
# are ready at the same time. So attention outside differentiation (inference) is computed
# for up to 16 slices of the batch apart, and its gradient for up to 8; the forward pass of a
# train step stays whole. Per round, 2-core Zen4: inference at batch 64, vit_small 1.058x,
# swin_tiny 1.044x (4 of 4 rounds each); vit_small's train step at batch 16 1.034x, 1.067x,
# 1.037x in three runs (4 of 5, 5 of 8, 6 of 8), swin_tiny's 1.007x (3 of 6). 16 slices for
# the gradient lost (vit_small 0.977x), as did slicing the train step's forward pass (0.953x).
ATTENTION_SLICES = 16  # 1 (before tracing): one batched matmul per product
ATTENTION_GRAD_SLICES = 8  # 1 (before tracing): the same for the gradient
MIN_SLICE_FLOPS = 8_000_000
# The gradient is sliced only for attention over at least 64 tokens: at Swin's 49-token
# windows its slices lost (swin_tiny's train step at batch 16 without them against 8 slices:
# 1.018x per round, 6 of 6 rounds faster; with 4: 1.013x, 5 of 6), where vit_small's 197
# tokens gain (above).
MIN_TOKENS_FOR_GRAD_SLICES = 64


def qkv_attention(qkv: jax.Array, scale: float, biases=()) -> jax.Array:
    """softmax(scale q k^T + sum(biases)) v for q, k, v = qkv [3, B, heads, N, head_dim] (the
    qkv projection's output); each bias broadcastable to [B, heads, N, N], float32 (the
    softmax is float32)."""
    if ATTENTION_VJP and jax.default_backend() == "cpu":
        return _attention_with_vjp(qkv, scale, tuple(biases))
    return _attention(qkv[0] * scale, qkv[1], qkv[2], biases)[0]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, biases=()) -> jax.Array:
    """`qkv_attention` of q (already scaled), k, v [B, heads, N, head_dim]."""
    return qkv_attention(jnp.stack([q, k, v]), 1.0, biases)


class Attention(nn.Module):
    """Multi-head self-attention with one fused `qkv` projection (Vaswani et al. 2017).

    `bias` (e.g. Swin's shifted-window mask), broadcastable to [B, heads, N, N], is added to
    the attention logits, computed with the softmax in float32. With `rel_pos_window` = W > 0
    the tokens are a w x w window (w <= W) and a learned relative position bias is added
    (Swin, Liu et al. 2021): `relative_position_bias_table` [(2W-1)^2, heads], indexed by the
    offset between two tokens; a smaller window uses the table's centre. `axis_name`: the
    `pmap` axis of the batch, for per-example dropout masks (`Dropout`).
    """

    num_heads: int
    qkv_bias: bool = True
    attn_dropout_rate: float = 0.0
    proj_dropout_rate: float = 0.0
    rel_pos_window: int = 0
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        bias: jax.Array | None = None,
        *,
        window: tuple[int, int] | None = None,
        train: bool,
    ) -> jax.Array:
        """x: [B, N, C]; `window`: the (h, w) layout of the N tokens for `rel_pos_window`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, tokens, dim = x.shape
        heads = self.num_heads
        head_dim = dim // heads
        # Heads-major [3, B, heads, N, head_dim] straight out of the qkv matmul (timm's layout):
        # XLA:CPU runs `bhqd,bhkd->bhqk` / `bhqk,bhkd->bhqd` as plain batched GEMMs, while the
        # token-major `bqhd,bkhd` forms cost strided copies inside the dot (the AV product 3.3x
        # slower at vit_small's shapes). Parameters are still `nn.Dense`'s kernel/bias.
        qkv = _HeadsDense(
            3 * dim,
            "bnc,cthd->tbhnd",
            (dim, 3, heads, head_dim),
            (3, 1, heads, 1, head_dim),
            self.qkv_bias,
            name="qkv",
            **kw,
        )(x)
        biases = []
        if self.rel_pos_window:
            size = 2 * self.rel_pos_window - 1
            table = self.param(
                "relative_position_bias_table",
                dense_init,
                (size * size, self.num_heads),
                self.param_dtype,
            )
            index = relative_position_index(window or (self.rel_pos_window,) * 2, size)
            rel_bias = jnp.take(table, index.reshape(-1), axis=0, mode="clip")  # in range
            rel_bias = rel_bias.reshape(tokens, tokens, self.num_heads)
            biases.append(rel_bias.transpose(2, 0, 1).astype(jnp.float32))
        if bias is not None:
            biases.append(bias)
        scale = head_dim**-0.5
        if train and self.attn_dropout_rate > 0:
            weights = attention_weights(qkv[0] * scale, qkv[1], biases).astype(self.dtype)
            weights = Dropout(self.attn_dropout_rate, self.axis_name)(weights, train=True)
            out = jnp.einsum("bhqk,bhkd->bhqd", weights, qkv[2])
        else:
            out = qkv_attention(qkv, scale, tuple(biases))
        out = _HeadsDense(dim, "bhnd,hdc->bnc", (heads, head_dim, dim), (dim,), name="proj", **kw)(
            out
        )
        return Dropout(self.proj_dropout_rate, self.axis_name)(out, train=train)


def check_patch_size(patch_size: int, height: int, width: int) -> None:
    """ValueError unless `patch_size` divides a height x width input (as timm's PatchEmbed
    asserts; a strided convolution would silently drop the remainder), naming the patch
    sizes that do."""
    if patch_size > 0 and height % patch_size == 0 and width % patch_size == 0:
        return
    fits = [p for p in range(2, min(height, width) + 1) if height % p == 0 and width % p == 0]
    raise ValueError(
        f"patch_size={patch_size} does not divide the {height}x{width} input; patch sizes "
        f"that do: {', '.join(map(str, fits)) or 'none above 1'} (or resize the input to a "
        f"multiple of {patch_size})"
    )


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: a patch_size-strided convolution (+ optional
    LayerNorm, as in Swin). [B, H, W, C] -> [B, H / patch, W / patch, embed_dim] (NHWC);
    the patch size must divide H and W (`check_patch_size`)."""

    embed_dim: int
    patch_size: int = 16
    norm: bool = False
    norm_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        check_patch_size(p, x.shape[1], x.shape[2])
        x = Conv(
            self.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            name="proj",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)
        if self.norm:
            x = layer_norm(
                self.norm_epsilon, self.dtype, param_dtype=self.param_dtype, name="norm"
            )(x)
        return x
