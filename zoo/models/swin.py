"""Swin Transformer, as in timm.

Paper: Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows". Self-attention within w x w windows, windows shifted by w/2 every other block (with
a mask so that tokens wrapped around by the cyclic shift do not attend to each other), a
learned relative position bias per window offset, and 2x2 patch merging between stages.

    model = zoo.create_model("swin_tiny_patch4_window7_224", num_classes=10)
    variables = model.init(rng, jnp.zeros((1, 224, 224, 3)), train=False)
    logits = model.apply(variables, images, train=False)  # [B, 10] float32

Other input sizes. As in timm, each stage's window and shift are fixed by `img_size` (the
resolution the weights were trained at): a stage whose feature map at `img_size` is no larger
than the window uses the whole map as its window, without shift (e.g. the last stage at 224).
At run time the input may have any size divisible by the patch size: feature maps are padded
to a multiple of the window and the shift mask is built for the padded map, exactly as timm's
`dynamic_img_size=True` (so 224-weights give timm's logits at 256 too, and a 32 px test input
runs). To change the windows themselves, build the model with `img_size=` (windows of stages
smaller than the window shrink as timm's do; the relative position table keeps its
(2 * window_size - 1)^2 shape and the smaller window reads its centre, where timm would
re-interpolate the table).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.models.attention import Attention
from zoo.models.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    block_input,
    check_patch_size,
    dense,
    dense_init,
    merge_input,
    windows_in,
    windows_out,
)
from zoo.models.norms import layer_norm
from zoo.models.registry import SMALL_IMAGE_32, PretrainedConfig, register_variant


def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """[B, H, W, C] -> [B * H/wh * W/ww, wh * ww, C], windows in row-major order per image
    (jax or numpy arrays)."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window[0], window[0], width // window[1], window[1], channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


def window_reverse(windows: jax.Array, window: tuple[int, int], height: int, width: int):
    """Inverse of `window_partition`: -> [B, H, W, C]."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window[0], width // window[1], *window, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shift_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]):
    """[num_windows, N, N] additive mask (0 or -100, as the reference) for shifted windows of
    a (padded) height x width map: tokens from different regions of the cyclic shift are kept
    apart."""
    region = np.zeros((1, height, width, 1), np.float32)
    count = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            region[:, hs, ws] = count
            count += 1
    ids = window_partition(region, window)[..., 0]  # numpy in, numpy out: [nW, N]
    return np.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0).astype(np.float32)


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP, each pre-norm with a residual and stochastic depth."""

    num_heads: int
    window: tuple[int, int]  # this block's window (clamped to small feature maps)
    shift: tuple[int, int]  # (0, 0) for W-MSA, window // 2 for SW-MSA
    table_window: int  # side of the window the relative position table is laid out for
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout_rate: float = 0.0
    attn_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    axis_name: str | None = None  # the pmap axis of the batch: per-example dropout masks
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = block_input(x)
        batch, height, width, channels = x.shape
        window, shift = self.window, self.shift
        y = layer_norm(1e-5, name="norm1", **kw)(x)
        if any(shift):
            y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
        pad_h, pad_w = (-height) % window[0], (-width) % window[1]
        y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))  # zeros, as timm
        padded_h, padded_w = height + pad_h, width + pad_w
        windows = window_partition(y, window)  # [B * nW, N, C]
        windows = windows_in(windows, train=train)
        mask = None
        if any(shift):
            mask = shift_mask(padded_h, padded_w, window, shift)  # [nW, N, N]
            mask = jnp.tile(jnp.asarray(mask)[:, None], (batch, 1, 1, 1))  # [B * nW, 1, N, N]
        windows = Attention(
            self.num_heads,
            self.qkv_bias,
            self.attn_dropout_rate,
            self.dropout_rate,
            rel_pos_window=self.table_window,
            axis_name=self.axis_name,  # windows are example-major: [B * nW, N, C]
            name="attn",
            **kw,
        )(windows, mask, window=window, train=train)
        windows = windows_out(windows, train=train)
        y = window_reverse(windows, window, padded_h, padded_w)[:, :height, :width]
        if any(shift):
            y = jnp.roll(y, shift, axis=(1, 2))
        x = x + DropPath(self.drop_path_rate, self.axis_name)(y, train=train)
        mlp = Mlp(
            int(channels * self.mlp_ratio),
            drop_rate=self.dropout_rate,
            kernel_init=dense_init,
            axis_name=self.axis_name,
            name="mlp",
            **kw,
        )
        y = mlp(layer_norm(1e-5, name="norm2", **kw)(x), train=train)
        return x + DropPath(self.drop_path_rate, self.axis_name)(y, train=train)


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one: concat to 4C, LayerNorm, Linear to `out_features`."""

    out_features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = merge_input(x)
        batch, height, width, channels = x.shape
        x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        height, width = x.shape[1], x.shape[2]
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
        # Channel order (dx, dy, c) as the reference: x[0::2, 0::2], x[1::2, 0::2], ...
        x = x.transpose(0, 1, 3, 4, 2, 5).reshape(batch, height // 2, width // 2, 4 * channels)
        x = layer_norm(1e-5, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return dense(
            self.out_features,
            use_bias=False,
            kernel_init=dense_init,
            name="reduction",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


class SwinTransformer(nn.Module):
    """Swin backbone + linear head.

    Attributes:
      num_classes: classes of the head; 0 returns pooled features [B, C].
      img_size: the resolution that fixes each stage's window and shift (see module doc).
      patch_size, embed_dim: patch embedding; stage i has embed_dim * 2**i channels.
      depths, num_heads: blocks and attention heads per stage.
      window_size: attention window side (and relative position table layout).
      dropout_rate, attn_dropout_rate: dropout in the MLPs and attention projections, and on
        the attention weights.
      drop_path_rate: stochastic depth, increased linearly over all blocks (timm's 0.1).
      axis_name: the `pmap` axis the batch is split over, so that dropout and stochastic
        depth draw each example's mask from its global index; None under `jit`.
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 4
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout_rate: float = 0.0
    attn_dropout_rate: float = 0.0
    drop_path_rate: float = 0.1
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check_input(self, height: int, width: int) -> None:
        """ValueError unless the model takes height x width inputs: the patch size divides
        both (windows need not divide the maps, which are padded: see the module doc)."""
        check_patch_size(self.patch_size, height, width)

    def stage_windows(self) -> list[tuple[int, int]]:
        """(window, shift) side of each stage, from the feature map size at `img_size`."""
        grid = self.img_size // self.patch_size
        out = []
        for i in range(len(self.depths)):
            size = math.ceil(grid / 2**i)
            if size <= self.window_size:
                out.append((size, 0))
            else:
                out.append((self.window_size, self.window_size // 2))
        return out

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        x = PatchEmbed(self.embed_dim, self.patch_size, norm=True, name="patch_embed", **kw)(x)
        total, index = sum(self.depths), 0
        stages = zip(self.depths, self.num_heads, self.stage_windows(), strict=True)
        for i, (depth, heads, (window, shift)) in enumerate(stages):
            features = self.embed_dim * 2**i
            if i > 0:
                x = PatchMerging(features, name=f"layers_{i}_downsample", **kw)(x)
            for j in range(depth):
                x = SwinBlock(
                    heads,
                    (window, window),
                    (0, 0) if j % 2 == 0 else (shift, shift),
                    self.window_size,
                    self.mlp_ratio,
                    self.qkv_bias,
                    self.dropout_rate,
                    self.attn_dropout_rate,
                    drop_path_rate=self.drop_path_rate * index / max(total - 1, 1),
                    axis_name=self.axis_name,
                    name=f"layers_{i}_blocks_{j}",
                    **kw,
                )(x, train=train)
                index += 1
        x = layer_norm(1e-5, name="norm", **kw)(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, C]
        if self.num_classes == 0:
            return x
        head = functools.partial(nn.Dense, kernel_init=dense_init, name="head", **kw)
        return head(self.num_classes)(x).astype(jnp.float32)


# --------------------------------------------------------------------------- timm weights


def swin_from_timm(state_dict: dict[str, np.ndarray], model: SwinTransformer) -> dict[str, Any]:
    """timm Swin state_dict -> flax variables {'params'}.

    `layers.1.blocks.0.*` -> `layers_1_blocks_0/*` (flat names: flax modules built in a loop),
    `layers.1.downsample.*` -> `layers_1_downsample/*`, `head.fc` -> `head`. Buffers of older
    checkpoints (relative_position_index, attn_mask) are dropped: they are recomputed.
    """
    from zoo.models.weights import torch_to_flax

    def rename(key, value):
        if key.endswith(("relative_position_index", "attn_mask")):
            return None
        parts = key.split(".")
        if parts[0] == "layers":  # layers.1.blocks.0.attn.qkv.weight -> layers_1_blocks_0.attn...
            stage, rest = parts[1], parts[2:]
            if rest[0] == "blocks":
                parts = [f"layers_{stage}_blocks_{rest[1]}", *rest[2:]]
            else:
                parts = [f"layers_{stage}_{rest[0]}", *rest[1:]]
        elif key.startswith("head.fc."):
            parts = ["head", parts[-1]]
        return ".".join(parts), value

    return torch_to_flax(state_dict, rename)


# --------------------------------------------------------------------------- variants


def _register(name: str, timm_tag: str, img_size: int = 224, **defaults):
    pretrained = PretrainedConfig(
        input_size=(img_size, img_size, 3),
        crop_pct=1.0 if img_size == 384 else 0.9,
        interpolation="bicubic",
        license="mit",
        timm_name=f"{name}.{timm_tag}",
    )
    defaults = dict(img_size=img_size, **defaults)
    register_variant(
        name, SwinTransformer, defaults, pretrained=pretrained, from_timm=swin_from_timm
    )


_register("swin_tiny_patch4_window7_224", "ms_in1k", depths=(2, 2, 6, 2))
_register("swin_small_patch4_window7_224", "ms_in22k_ft_in1k", depths=(2, 2, 18, 2))
_register(
    "swin_base_patch4_window7_224",
    "ms_in22k_ft_in1k",
    embed_dim=128,
    depths=(2, 2, 18, 2),
    num_heads=(4, 8, 16, 32),
)
_register(
    "swin_base_patch4_window12_384",
    "ms_in22k_ft_in1k",
    img_size=384,
    embed_dim=128,
    depths=(2, 2, 18, 2),
    num_heads=(4, 8, 16, 32),
    window_size=12,
)

# zoo's own 32 px variant (no timm counterpart, no weights) for small-image datasets: 2 px
# patches, three stages on 16 -> 8 -> 4 grids, each divided by the 4 x 4 window (the last
# stage's window is its whole map, unshifted, as timm's are when the map fits in the window).
register_variant(
    "swin_nano_patch2_window4_32",
    SwinTransformer,
    dict(
        img_size=32,
        patch_size=2,
        embed_dim=48,
        depths=(2, 2, 2),
        num_heads=(3, 6, 12),
        window_size=4,
        num_classes=10,
    ),
    pretrained=SMALL_IMAGE_32,
    from_timm=swin_from_timm,
)
