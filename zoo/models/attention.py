"""Multi-head self-attention (Vaswani et al. 2017) with one fused `qkv` projection and an
optional relative position bias (Swin, Liu et al. 2021); shared by ViT/DeiT and Swin. The
attention itself is `zoo.cpu.attention.qkv_attention` (plain softmax attention, with a
hand-written gradient on CPU). Submodule names follow timm's state_dict keys (`qkv`, `proj`)
so that converters are a rename plus layout transposes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.cpu.attention import attention_weights, qkv_attention
from zoo.models.layers import Dropout, dense_init


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
