"""Blocks shared by model families: dropout and stochastic depth, pooling, the transformer
MLP, layer scale, squeeze-excite, patch embedding, and the identities that mark a residual
block's input and output (where zoo's CPU routes keep buffers, zoo/cpu/buffers.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from zoo import parallel
from zoo.cpu import current
from zoo.cpu.buffers import block_input, block_output, merge_input, windows_in, windows_out
from zoo.cpu.matmul import dense_dot_general
from zoo.cpu.norms import window_max
from zoo.models.conv import Conv
from zoo.models.norms import layer_norm

__all__ = ["block_input", "block_output", "merge_input", "windows_in", "windows_out"]


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


def dense(features: int, **kw) -> nn.Dense:
    """`nn.Dense` (same parameters and results) whose kernel gradient on CPU takes zoo's matmul
    route (zoo/cpu/matmul.py)."""
    return nn.Dense(features, dot_general=dense_dot_general, **kw)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C], accumulated in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def max_pool(x: jax.Array, window=(3, 3), strides=(2, 2), pads=((1, 1), (1, 1))) -> jax.Array:
    """`nn.max_pool` on NHWC x with explicit pads; the same values and gradients (on CPU an
    elementwise maximum over the shifted windows with a hand-written backward,
    `CpuPolicy.max_pool_vjp`)."""
    window, strides = tuple(window), tuple(strides)
    pads = tuple(tuple(p) for p in pads)
    policy = current()
    if policy is None or not policy.max_pool_vjp:
        return nn.max_pool(x, window, strides=strides, padding=pads)
    return window_max(x, window, strides, pads)


_SQRT_HALF = 0.5**0.5  # a Python float: keeps x's dtype


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the exact erf form, as torch's `nn.GELU()` (flax's default is the tanh fit):
    x * (1 + erf(x / sqrt 2)) / 2, torch's own formula.

    `nn.gelu(x, approximate=False)` computes the same with `erfc`, which XLA:CPU expands into
    several fusions, slower than `erf`'s polynomial (benchmarks/SPEED.md, "CPU policy
    fields"). The two differ by < 1e-6.
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
        x = self.act(dense(self.hidden_features, name="fc1", **kw)(x))
        x = Dropout(self.drop_rate, self.axis_name)(x, train=train)
        x = dense(out_features, name="fc2", **kw)(x)
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


# timm initialises the Linears of its transformers with `trunc_normal_(std=.02)`, whose cut-off
# is at +-2 in absolute value, i.e. 100 standard deviations: a plain normal(0.02), zero bias.
dense_init = nn.initializers.normal(stddev=0.02)


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
