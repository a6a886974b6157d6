"""ConvNeXt (as in timm): a ResNet modernised step by step towards the Swin design.

Paper: Liu et al. 2022, "A ConvNet for the 2020s". The atto/nano sizes are timm's own
(Wightman); timm builds them with `conv_mlp=True` (1x1 convolutions instead of linear layers
in the block MLP), which is the same function and parameter count, so here every block uses
dense layers on channels-last maps and the converter reshapes 1x1 kernels.

    model = zoo.create_model("convnext_tiny", num_classes=10, drop_path_rate=0.1)
    variables = model.init(rng, jnp.zeros((1, 224, 224, 3)), train=False)
    logits = model.apply(variables, images, train=False)  # [B, 10] float32

Layout: stem = 4x4/4 patch conv + LayerNorm; four stages, each (but the first) opened by
LayerNorm + 2x2/2 conv; block = depthwise 7x7 -> LayerNorm -> Linear(4C) -> GELU -> Linear(C)
-> LayerScale -> stochastic depth -> + x; head = global average pool -> LayerNorm -> Linear.
Submodules follow timm's state_dict names (`stages.1.blocks.0.conv_dw` <-> `stages_1/blocks_0/
conv_dw`), except the head's norm and classifier, which are top-level `head_norm`/`head_fc` so
that fine-tuning re-initialises only the classifier.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.models.conv import Conv
from zoo.models.layers import Dropout, DropPath, LayerScale, Mlp, global_avg_pool
from zoo.models.norms import LayerNorm
from zoo.models.registry import SMALL_IMAGE_32, PretrainedConfig, register_variant
from zoo.models.weights import torch_to_flax

# timm initialises every conv and linear weight with trunc_normal(std=0.02), biases with 0.
weight_init = nn.initializers.truncated_normal(0.02)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, inverted MLP (4x), LayerScale, residual."""

    features: int
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    ls_init_value: float | None = 1e-6
    drop_path_rate: float = 0.0
    norm: Any = nn.LayerNorm
    axis_name: str | None = None  # the pmap axis of the batch: per-example drop-path masks
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        k, pad = self.kernel_size, self.kernel_size // 2
        y = Conv(
            self.features,
            (k, k),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=self.features,
            kernel_init=weight_init,
            name="conv_dw",
            **kw,
        )(x)
        y = self.norm(name="norm")(y)
        y = Mlp(
            int(self.mlp_ratio * self.features),
            kernel_init=weight_init,
            axis_name=self.axis_name,
            name="mlp",
            **kw,
        )(y, train=train)
        if self.ls_init_value is not None:
            y = LayerScale(self.ls_init_value, param_dtype=self.param_dtype, name="ls")(y)
        return x + DropPath(self.drop_path_rate, self.axis_name)(y, train=train)


class ConvNeXtStage(nn.Module):
    """Optional downsampling (LayerNorm + 2x2/2 conv) followed by `depth` blocks."""

    features: int
    depth: int
    downsample: bool = True
    kernel_size: int = 7
    ls_init_value: float | None = 1e-6
    drop_path_rates: Sequence[float] = ()
    norm: Any = nn.LayerNorm
    axis_name: str | None = None  # the pmap axis of the batch: per-example drop-path masks
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.downsample:
            x = self.norm(name="downsample_0")(x)
            x = Conv(
                self.features,
                (2, 2),
                strides=(2, 2),
                padding="VALID",
                kernel_init=weight_init,
                name="downsample_1",
                **kw,
            )(x)
        rates = self.drop_path_rates or (0.0,) * self.depth
        for j in range(self.depth):
            x = ConvNeXtBlock(
                self.features,
                kernel_size=self.kernel_size,
                ls_init_value=self.ls_init_value,
                drop_path_rate=rates[j],
                norm=self.norm,
                axis_name=self.axis_name,
                name=f"blocks_{j}",
                **kw,
            )(x, train=train)
        return x


class ConvNeXt(nn.Module):
    """ConvNeXt backbone + LayerNorm/linear head.

    Attributes:
      depths: blocks per stage, e.g. (3, 3, 9, 3) for ConvNeXt-T.
      dims: channels per stage, e.g. (96, 192, 384, 768).
      num_classes: classes of the head; 0 returns the pooled, normalised features [B, C].
      kernel_size: depthwise kernel size.
      patch_size: stride and size of the patchify stem.
      ls_init_value: initial LayerScale; None disables LayerScale.
      drop_path_rate: stochastic depth, increased linearly over all blocks up to this rate.
      drop_rate: dropout before the classifier.
      head_init_scale: scales the initial classifier weights (the paper uses 0.001 to fine-tune).
      norm_epsilon: LayerNorm epsilon (timm: 1e-6).
      axis_name: the `pmap` axis the batch is split over, so that stochastic depth and
        dropout draw each example's mask from its global index; None under `jit`.
    """

    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    num_classes: int = 1000
    kernel_size: int = 7
    patch_size: int = 4
    ls_init_value: float | None = 1e-6
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    head_init_scale: float = 1.0
    norm_epsilon: float = 1e-6
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def check_input(self, height: int, width: int) -> None:
        """ValueError unless the last stage's feature map is at least 1x1: the stem divides
        the input by `patch_size` and each later stage by 2 (flooring, as timm's)."""
        smallest = self.patch_size * 2 ** (len(self.depths) - 1)
        if min(height, width) < smallest:
            raise ValueError(
                f"ConvNeXt needs inputs of at least {smallest}x{smallest} (a {self.patch_size}x"
                f"{self.patch_size} stem and {len(self.depths) - 1} 2x2 downsamplings), got "
                f"{height}x{width}; resize the images"
            )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Two-pass variance (torch's): E[x^2] - E[x]^2 loses digits on large activations.
        norm = functools.partial(
            LayerNorm, epsilon=self.norm_epsilon, use_fast_variance=False, **kw
        )
        x = x.astype(self.dtype)
        p = self.patch_size
        x = Conv(
            self.dims[0],
            (p, p),
            strides=(p, p),
            padding="VALID",
            kernel_init=weight_init,
            name="stem_0",
            **kw,
        )(x)  # [B, H/4, W/4, C0]
        x = norm(name="stem_1")(x)

        total, start = sum(self.depths), 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims, strict=True)):
            rates = [self.drop_path_rate * (start + j) / max(total - 1, 1) for j in range(depth)]
            x = ConvNeXtStage(
                dim,
                depth,
                downsample=i > 0,
                kernel_size=self.kernel_size,
                ls_init_value=self.ls_init_value,
                drop_path_rates=tuple(rates),
                norm=norm,
                axis_name=self.axis_name,
                name=f"stages_{i}",
                **kw,
            )(x, train=train)
            start += depth

        x = norm(name="head_norm")(global_avg_pool(x))  # [B, C]
        if self.num_classes == 0:
            return x.astype(jnp.float32)
        x = Dropout(self.drop_rate, self.axis_name)(x, train=train)
        head_init = nn.initializers.truncated_normal(0.02 * self.head_init_scale)
        x = nn.Dense(self.num_classes, kernel_init=head_init, name="head_fc", **kw)(x)
        return x.astype(jnp.float32)


# --------------------------------------------------------------------------- timm weights


def convnext_from_timm(
    state_dict: dict[str, np.ndarray], model: nn.Module | None = None
) -> dict[str, Any]:
    """timm ConvNeXt state_dict -> flax variables {'params': ...}.

    Besides the generic renaming (`zoo.models.weights.torch_to_flax`): the block's
    `gamma` becomes `ls/gamma`, `head.norm`/`head.fc` become `head_norm`/`head_fc`, and the
    1x1-conv MLP weights of `conv_mlp` variants (atto, nano) [out, in, 1, 1] become dense.
    """

    def rename(key: str, value: np.ndarray):
        if key.startswith("head.norm."):
            key = "head_norm." + key[len("head.norm.") :]
        elif key.startswith("head.fc."):
            key = "head_fc." + key[len("head.fc.") :]
        elif key.endswith(".gamma"):
            key = key[: -len("gamma")] + "ls.gamma"
        elif ".mlp.fc" in key and value.ndim == 4:
            value = value[:, :, 0, 0]
        return key, value

    return torch_to_flax(state_dict, rename)


# --------------------------------------------------------------------------- variants


def _register(name: str, tag: str, crop_pct: float, **defaults):
    pretrained = PretrainedConfig(
        timm_name=f"{name}.{tag}",
        interpolation="bicubic",
        crop_pct=crop_pct,
        license="apache-2.0",
    )
    register_variant(
        name,
        ConvNeXt,
        defaults,
        pretrained=pretrained,
        from_timm=convnext_from_timm,
        head=("head_fc",),
    )


# timm's default weights for each name (its first pretrained tag) and their eval crop.
_register("convnext_atto", "d2_in1k", 0.875, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320))
_register("convnext_nano", "in12k_ft_in1k", 0.95, depths=(2, 2, 8, 2), dims=(80, 160, 320, 640))
_register("convnext_tiny", "in12k_ft_in1k", 0.95, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
_register("convnext_small", "in12k_ft_in1k", 0.95, depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
_register(
    "convnext_base", "fb_in22k_ft_in1k", 0.875, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)
)
_register(
    "convnext_large", "fb_in22k_ft_in1k", 0.875, depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)
)

# zoo's own 32 px variant (no timm counterpart, no weights) for small-image datasets:
# ConvNeXt-Atto with a 2 x 2 stem, so the four stages see 16 -> 8 -> 4 -> 2 grids instead of
# 8 -> 4 -> 2 -> 1 (a 1 x 1 last stage would leave its 7 x 7 depthwise kernels one tap each).
register_variant(
    "convnext_atto_stem2_32",
    ConvNeXt,
    dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), patch_size=2, num_classes=10),
    pretrained=SMALL_IMAGE_32,
    from_timm=convnext_from_timm,
    head=("head_fc",),
)
