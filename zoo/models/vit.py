"""Vision Transformer (ViT) and DeiT, as in timm.

Papers: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (ViT); Touvron et al. 2021,
"Training data-efficient image transformers & distillation through attention" (DeiT, with its
distillation token); Steiner et al. 2022, "How to train your ViT?" (the AugReg weights).

    model = zoo.create_model("vit_small_patch16_224", num_classes=10)
    variables = model.init(rng, jnp.zeros((1, 224, 224, 3)), train=False)
    logits = model.apply(variables, images, train=False)  # [B, 10] float32

Any input size divisible by the patch size runs: a learned position embedding (trained on
an `img_size` grid) is resized bicubically to the input's grid on the fly, exactly as timm's
`dynamic_img_size=True` does (torch's antialiased bicubic == `jax.image.resize` "bicubic"),
so 224-pixel weights run at 384 with timm's logits. Building the model with `img_size=384`
instead resizes the embedding once when the weights are converted.

Submodules are named after timm's state_dict keys (`blocks_3.attn.qkv` <-> `blocks.3.attn.qkv`),
so `vit_from_timm` is the generic rename of `zoo.models.weights.torch_to_flax`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.models.attention import Attention
from zoo.models.layers import (
    Dropout,
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    block_input,
    check_patch_size,
    dense_init,
)
from zoo.models.norms import layer_norm
from zoo.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    SMALL_IMAGE_32,
    PretrainedConfig,
    register_variant,
)


def resize_pos_embed(pos_embed: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Bicubic (antialiased, as torch's `F.interpolate(antialias=True)`) resize of a square
    grid of position embeddings [1, g*g, C] to [1, grid[0]*grid[1], C], computed in float32."""
    old = int(round(np.sqrt(pos_embed.shape[1])))
    if (old, old) == tuple(grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    x = pos_embed.astype(jnp.float32).reshape(1, old, old, dim)
    x = jax.image.resize(x, (1, *grid, dim), method="bicubic", antialias=True)
    return x.reshape(1, grid[0] * grid[1], dim).astype(pos_embed.dtype)


def sincos_pos_embed(grid: tuple[int, int], dim: int, temperature: float = 10_000.0):
    """Fixed 2-D sine-cosine position embedding [1, h*w, dim] (as in MAE / big_vision)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim % 4 == 0, got {dim}")
    y, x = np.mgrid[: grid[0], : grid[1]].astype(np.float32)
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float32) / (dim // 4))
    x = x.reshape(-1, 1) * omega  # [h*w, dim/4]
    y = y.reshape(-1, 1) * omega
    return jnp.asarray(np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], 1)[None])


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(ls1(attn(norm1(x)))), then the same with mlp."""

    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None  # LayerScale init; None = no LayerScale
    dropout_rate: float = 0.0
    attn_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    axis_name: str | None = None  # the pmap axis of the batch: per-example dropout masks
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = block_input(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(layer_norm, 1e-6, **kw)
        scale = (
            (lambda name: LayerScale(self.init_values, self.param_dtype, name=name))
            if self.init_values is not None
            else (lambda name: lambda y: y)
        )
        y = Attention(
            self.num_heads,
            self.qkv_bias,
            self.attn_dropout_rate,
            self.dropout_rate,
            axis_name=self.axis_name,
            name="attn",
            **kw,
        )(norm(name="norm1")(x), train=train)
        x = x + DropPath(self.drop_path_rate, self.axis_name)(scale("ls1")(y), train=train)
        mlp = Mlp(
            int(x.shape[-1] * self.mlp_ratio),
            drop_rate=self.dropout_rate,
            kernel_init=dense_init,
            axis_name=self.axis_name,
            name="mlp",
            **kw,
        )
        y = mlp(norm(name="norm2")(x), train=train)
        return x + DropPath(self.drop_path_rate, self.axis_name)(scale("ls2")(y), train=train)


class VisionTransformer(nn.Module):
    """ViT / DeiT backbone + linear head.

    Attributes:
      num_classes: classes of the head; 0 returns pooled features [B, embed_dim].
      img_size: input side the learned position embedding is laid out for (its grid is
        img_size // patch_size); other input sizes resize it on the fly.
      patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer.
      global_pool: "token" (class token) or "avg" (mean of the patch tokens).
      class_token: prepend a learned class token.
      pos_embed: "learn" (a parameter), "sincos" (fixed 2-D sin-cos) or "none".
      fc_norm: LayerNorm after pooling instead of before it; None = timm's default (only for
        global_pool="avg").
      init_values: LayerScale init value (CaiT/DeiT-III); None = no LayerScale.
      distilled: DeiT's distillation token and second head `head_dist`. At inference the two
        heads' logits are averaged (as in DeiT and timm).
      distilled_training: with `distilled`, return `(cls_logits, dist_logits)` when
        `train=True` so a distillation loss can use both; the default False averages them in
        training too, which is timm's default (`set_distilled_training(False)`).
      dropout_rate: dropout after the position embedding, in attention projections and MLPs.
      attn_dropout_rate: dropout on attention weights.
      drop_path_rate: stochastic depth, increased linearly over blocks up to this rate.
      axis_name: the `pmap` axis the batch is split over, so that dropout and stochastic
        depth draw each example's mask from its global index; None under `jit`.
    """

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    global_pool: str = "token"
    class_token: bool = True
    pos_embed: str = "learn"
    fc_norm: bool | None = None
    init_values: float | None = None
    distilled: bool = False
    distilled_training: bool = False
    dropout_rate: float = 0.0
    attn_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled)

    def check_input(self, height: int, width: int) -> None:
        """ValueError unless the model takes height x width inputs: the patch size divides
        both (checked before tracing by `zoo.models.check_input_size`)."""
        check_patch_size(self.patch_size, height, width)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool):
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got '{self.global_pool}'")
        if self.pos_embed not in ("learn", "sincos", "none"):
            raise ValueError(f"pos_embed must be learn, sincos or none, got '{self.pos_embed}'")
        if (self.global_pool == "token" or self.distilled) and not self.class_token:
            raise ValueError("global_pool='token' and distilled need class_token=True")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        x = PatchEmbed(self.embed_dim, self.patch_size, name="patch_embed", **kw)(x)
        batch, height, width, dim = x.shape
        x = x.reshape(batch, height * width, dim)  # [B, N, C]

        prefix = []
        for name, present in (("cls_token", self.class_token), ("dist_token", self.distilled)):
            if present:
                token = self.param(
                    name, nn.initializers.normal(1e-6), (1, 1, dim), self.param_dtype
                )
                prefix.append(jnp.broadcast_to(token.astype(self.dtype), (batch, 1, dim)))
        x = jnp.concatenate([*prefix, x], axis=1)  # [B, prefix + N, C]

        if self.pos_embed == "learn":
            grid = self.img_size // self.patch_size
            pos = self.param(
                "pos_embed",
                dense_init,  # timm: trunc_normal_(std=.02)
                (1, self.num_prefix_tokens + grid * grid, dim),
                self.param_dtype,
            )
            pos_prefix, pos_grid = (
                pos[:, : self.num_prefix_tokens],
                pos[:, self.num_prefix_tokens :],
            )
            pos_grid = resize_pos_embed(pos_grid, (height, width))
            x = x + jnp.concatenate([pos_prefix, pos_grid], axis=1).astype(self.dtype)
        elif self.pos_embed == "sincos":  # no embedding for the prefix tokens (as in MAE)
            pos = sincos_pos_embed((height, width), dim).astype(self.dtype)
            x = x.at[:, self.num_prefix_tokens :].add(pos)
        x = Dropout(self.dropout_rate, self.axis_name)(x, train=train)

        for i in range(self.depth):
            x = Block(
                self.num_heads,
                self.mlp_ratio,
                self.qkv_bias,
                self.init_values,
                self.dropout_rate,
                self.attn_dropout_rate,
                drop_path_rate=self.drop_path_rate * i / max(self.depth - 1, 1),
                axis_name=self.axis_name,
                name=f"blocks_{i}",
                **kw,
            )(x, train=train)

        use_fc_norm = self.global_pool == "avg" if self.fc_norm is None else self.fc_norm
        if not use_fc_norm:
            x = layer_norm(1e-6, name="norm", **kw)(x)
        if self.global_pool == "avg":
            pooled = [jnp.mean(x[:, self.num_prefix_tokens :].astype(jnp.float32), axis=1)]
        elif self.distilled:
            pooled = [x[:, 0], x[:, 1]]
        else:
            pooled = [x[:, 0]]
        if use_fc_norm:
            pooled = [layer_norm(1e-6, name="fc_norm", **kw)(p) for p in pooled]

        if self.num_classes == 0:
            return (sum(p.astype(jnp.float32) for p in pooled) / len(pooled)).astype(jnp.float32)
        head = functools.partial(nn.Dense, self.num_classes, kernel_init=dense_init)
        logits = [head(name="head", **kw)(pooled[0]).astype(jnp.float32)]
        if self.distilled:
            logits.append(head(name="head_dist", **kw)(pooled[-1]).astype(jnp.float32))
            if train and self.distilled_training:
                return logits[0], logits[1]
        return sum(logits) / len(logits)


# --------------------------------------------------------------------------- timm weights


def vit_from_timm(state_dict: dict[str, np.ndarray], model: VisionTransformer) -> dict[str, Any]:
    """timm ViT/DeiT state_dict -> flax variables {'params'}.

    A generic rename (see `torch_to_flax`); `pos_embed` is resized when `model.img_size` lays
    out another grid than the weights (e.g. 224 weights into a model built for 384).
    """
    from zoo.models.weights import torch_to_flax

    def rename(key, value):
        if key == "pos_embed" and model.pos_embed == "learn":
            prefix = model.num_prefix_tokens
            grid = model.img_size // model.patch_size
            if value.shape[1] - prefix != grid * grid:
                resized = resize_pos_embed(jnp.asarray(value[:, prefix:]), (grid, grid))
                value = np.concatenate([value[:, :prefix], np.asarray(resized)], axis=1)
        return key, value

    return torch_to_flax(state_dict, rename)


# --------------------------------------------------------------------------- variants

_SIZES = {  # embed_dim, depth, num_heads
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def _register(name: str, timm_tag: str, size: str, patch_size: int, **defaults):
    embed_dim, depth, num_heads = _SIZES[size]
    defaults = dict(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **defaults
    )
    deit = name.startswith("deit")
    pretrained = PretrainedConfig(
        input_size=(224, 224, 3),
        crop_pct=0.9,
        mean=IMAGENET_MEAN if deit else INCEPTION_MEAN,
        std=IMAGENET_STD if deit else INCEPTION_STD,
        interpolation="bicubic",
        license="apache-2.0",
        timm_name=f"{name}.{timm_tag}",
    )
    head = ("head", "head_dist") if defaults.get("distilled") else ("head",)
    register_variant(
        name,
        VisionTransformer,
        defaults,
        pretrained=pretrained,
        from_timm=vit_from_timm,
        head=head,
    )


_register("vit_tiny_patch16_224", "augreg_in21k_ft_in1k", "tiny", 16)
_register("vit_small_patch16_224", "augreg_in21k_ft_in1k", "small", 16)
_register("vit_base_patch16_224", "augreg2_in21k_ft_in1k", "base", 16)
_register("vit_base_patch32_224", "augreg_in21k_ft_in1k", "base", 32)
_register("vit_large_patch16_224", "augreg_in21k_ft_in1k", "large", 16)
_register("deit_tiny_patch16_224", "fb_in1k", "tiny", 16)
_register("deit_small_patch16_224", "fb_in1k", "small", 16)
_register("deit_base_patch16_224", "fb_in1k", "base", 16)
_register("deit_base_distilled_patch16_224", "fb_in1k", "base", 16, distilled=True)

# zoo's own 32 px variant (no timm counterpart, no weights) for small-image datasets: 4 px
# patches give an 8 x 8 grid (+ the class token), the token count of a 16 px ViT at 128 px.
register_variant(
    "vit_nano_patch4_32",
    VisionTransformer,
    dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, num_classes=10),
    pretrained=SMALL_IMAGE_32,
    from_timm=vit_from_timm,
)
