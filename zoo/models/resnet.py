"""ResNet v1.5, ResNeXt and Wide ResNet (as in timm/torchvision), and the CIFAR ResNets.

Papers: He et al. 2016, "Deep Residual Learning for Image Recognition" (ResNet; the CIFAR
ResNet-20/32/44/56 of its section 4.2); Xie et al. 2017 (ResNeXt); Zagoruyko & Komodakis 2016
(Wide ResNet). "v1.5" puts the stride on the 3x3 convolution of the bottleneck, as timm does.

    model = zoo.create_model("resnet50", num_classes=10)
    variables = model.init(rng, jnp.zeros((1, 224, 224, 3)), train=False)
    logits = model.apply(variables, images, train=False)  # [B, 10] float32

Submodules are named after timm's state_dict keys (`layer1_0.conv1` <-> `layer1.0.conv1`), so
`resnet_from_timm` is a direct rename plus layout transposes.
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
from zoo.models.layers import DropPath, block_output, global_avg_pool, max_pool
from zoo.models.norms import BatchNorm
from zoo.models.registry import PretrainedConfig, register_variant

# timm/torchvision initialise convolutions with kaiming_normal(fan_out, relu).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, strides: int = 1, groups: int = 1, **kw) -> Conv:
    # Explicit symmetric padding k//2, as torch does: "SAME" pads (0, 1) for a stride-2 3x3
    # convolution on an even input, which would shift every feature map by one pixel.
    pad = kernel // 2
    return Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=conv_init,
        **kw,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; `shortcut="pad"` is the parameter-free option A of the CIFAR
    ResNets (subsample + zero-pad channels), "projection" a 1x1 conv + BN (option B)."""

    features: int
    strides: int = 1
    shortcut: str = "projection"
    drop_path_rate: float = 0.0
    zero_init_last: bool = True
    norm: Any = BatchNorm
    axis_name: str | None = None  # the pmap axis of the batch: per-example drop-path masks
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x, *, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        last_scale = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        y = conv(self.features, 3, self.strides, name="conv1", **kw)(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv(self.features, 3, name="conv2", **kw)(y)
        y = self.norm(name="bn2", scale_init=last_scale)(y)
        y = DropPath(self.drop_path_rate, self.axis_name)(y, train=train)
        return block_output(nn.relu(y + residual_shortcut(self, x, self.features)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt, strided: v1.5), 1x1 expand by 4."""

    features: int
    strides: int = 1
    groups: int = 1
    base_width: int = 64
    shortcut: str = "projection"
    drop_path_rate: float = 0.0
    zero_init_last: bool = True
    norm: Any = BatchNorm
    axis_name: str | None = None  # the pmap axis of the batch: per-example drop-path masks
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, *, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = int(self.features * (self.base_width / 64)) * self.groups
        last_scale = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        y = conv(width, 1, name="conv1", **kw)(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv(width, 3, self.strides, self.groups, name="conv2", **kw)(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = conv(self.features * 4, 1, name="conv3", **kw)(y)
        y = self.norm(name="bn3", scale_init=last_scale)(y)
        y = DropPath(self.drop_path_rate, self.axis_name)(y, train=train)
        return block_output(nn.relu(y + residual_shortcut(self, x, self.features * 4)))


def residual_shortcut(block: nn.Module, x: jax.Array, out_features: int) -> jax.Array:
    """The identity branch of a residual block, adapted to the block's output shape."""
    if block.strides == 1 and x.shape[-1] == out_features:
        return x
    if block.shortcut == "pad":  # option A: no parameters
        x = x[:, :: block.strides, :: block.strides, :]
        extra = out_features - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    # Named "downsample_0"/"downsample_1" after timm's `downsample.0` / `downsample.1`.
    x = conv(
        out_features,
        1,
        block.strides,
        name="downsample_0",
        dtype=block.dtype,
        param_dtype=block.param_dtype,
    )(x)
    return block.norm(name="downsample_1")(x)


CHOICES = {  # ResNet's string fields
    "block": ("basic", "bottleneck"),
    "stem": ("imagenet", "cifar"),
    "shortcut": ("projection", "pad"),
}


class ResNet(nn.Module):
    """ResNet backbone + linear head.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: "basic" or "bottleneck".
      num_classes: classes of the head; 0 returns pooled features [B, C].
      stage_widths: base width of each stage (before bottleneck expansion).
      stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (one 3x3/1 conv).
      stem_width: output channels of the stem.
      groups, base_width: ResNeXt cardinality and width per group (Wide ResNet: base_width=128).
      shortcut: "projection" (1x1 conv + BN) or "pad" (the CIFAR ResNets' option A).
      drop_path_rate: stochastic depth, increased linearly over blocks up to this rate.
      zero_init_last: zero-init the last BN scale in each block (Goyal et al. 2017).
      bn_momentum, bn_epsilon: BatchNorm running-average decay (torch's 0.1 = 0.9 here).
      axis_name: the `pmap` axis the batch is split over: BatchNorm statistics over the global
        batch, stochastic depth masks keyed by the global example index; None under `jit`,
        where arrays are global already.
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    num_classes: int = 1000
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    groups: int = 1
    base_width: int = 64
    shortcut: str = "projection"
    drop_path_rate: float = 0.0
    zero_init_last: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # Checked when the model is built (create_model), not when it is first traced.
        for field, allowed in CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"{field} must be {' or '.join(map(repr, allowed))}, got "
                    f"{getattr(self, field)!r}"
                )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(
            BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            axis_name=self.axis_name,
            **kw,
        )
        x = x.astype(self.dtype)
        if self.stem == "cifar":
            x = conv(self.stem_width, 3, name="conv1", **kw)(x)
            x = nn.relu(norm(name="bn1")(x))
        elif self.stem == "imagenet":
            x = conv(self.stem_width, 7, 2, name="conv1", **kw)(x)
            x = nn.relu(norm(name="bn1")(x))
            x = max_pool(x, (3, 3), strides=(2, 2), pads=((1, 1), (1, 1)))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got '{self.stem}'")

        total_blocks, index = sum(self.stage_sizes), 0
        for i, (num_blocks, width) in enumerate(
            zip(self.stage_sizes, self.stage_widths, strict=True)
        ):
            for j in range(num_blocks):
                rate = self.drop_path_rate * index / max(total_blocks - 1, 1)
                common = dict(
                    strides=2 if (i > 0 and j == 0) else 1,
                    shortcut=self.shortcut,
                    drop_path_rate=rate,
                    zero_init_last=self.zero_init_last,
                    norm=norm,
                    axis_name=self.axis_name,
                    name=f"layer{i + 1}_{j}",
                    **kw,
                )
                if self.block == "basic":
                    x = BasicBlock(width, **common)(x, train=train)
                else:
                    x = Bottleneck(width, groups=self.groups, base_width=self.base_width, **common)(
                        x, train=train
                    )
                index += 1

        x = global_avg_pool(x)  # [B, C]
        if self.num_classes == 0:
            return x.astype(jnp.float32)
        x = nn.Dense(self.num_classes, name="fc", **kw)(x)
        return x.astype(jnp.float32)


# --------------------------------------------------------------------------- timm weights


def resnet_from_timm(
    state_dict: dict[str, np.ndarray], model: nn.Module | None = None
) -> dict[str, Any]:
    """timm/torchvision ResNet state_dict -> flax variables {'params', 'batch_stats'}.

    Conv kernels OIHW -> HWIO, linear [out, in] -> [in, out]; BN weight/bias -> scale/bias,
    running_mean/var -> batch_stats mean/var. `num_batches_tracked` is dropped.
    """
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def put(tree, path, value):
        for key in path[:-1]:
            tree = tree.setdefault(key, {})
        tree[path[-1]] = np.asarray(value)

    for key, value in state_dict.items():
        value = np.asarray(value)
        *module, leaf = key.split(".")
        # "layer1.0.downsample.1" -> ["layer1_0", "downsample_1"]
        path, parts = [], list(module)
        while parts:
            head = parts.pop(0)
            if parts and parts[0].isdigit():
                head = f"{head}_{parts.pop(0)}"
            path.append(head)
        if leaf == "num_batches_tracked":
            continue
        if leaf == "running_mean":
            put(stats, path + ["mean"], value)
        elif leaf == "running_var":
            put(stats, path + ["var"], value)
        elif leaf == "weight" and value.ndim == 4:
            put(params, path + ["kernel"], value.transpose(2, 3, 1, 0))
        elif leaf == "weight" and value.ndim == 2:
            put(params, path + ["kernel"], value.T)
        elif leaf == "weight":
            put(params, path + ["scale"], value)
        elif leaf == "bias":
            put(params, path + ["bias"], value)
        else:
            raise ValueError(f"unexpected timm ResNet key '{key}'")
    return {"params": params, "batch_stats": stats}


# --------------------------------------------------------------------------- variants


def _imagenet(timm_name: str, interpolation: str = "bicubic", crop_pct: float = 0.95):
    return PretrainedConfig(
        timm_name=timm_name,
        interpolation=interpolation,
        crop_pct=crop_pct,
        license="apache-2.0",
    )


def _register(name: str, pretrained: PretrainedConfig | None, **defaults):
    register_variant(
        name, ResNet, defaults, pretrained=pretrained, from_timm=resnet_from_timm, head=("fc",)
    )


_register("resnet18", _imagenet("resnet18.a1_in1k"), stage_sizes=(2, 2, 2, 2), block="basic")
_register("resnet34", _imagenet("resnet34.a1_in1k"), stage_sizes=(3, 4, 6, 3), block="basic")
_register("resnet50", _imagenet("resnet50.a1_in1k"), stage_sizes=(3, 4, 6, 3))
_register("resnet101", _imagenet("resnet101.a1h_in1k"), stage_sizes=(3, 4, 23, 3))
_register("resnet152", _imagenet("resnet152.a1h_in1k"), stage_sizes=(3, 8, 36, 3))
_register(
    "resnext50_32x4d",
    _imagenet("resnext50_32x4d.a1h_in1k"),
    stage_sizes=(3, 4, 6, 3),
    groups=32,
    base_width=4,
)
_register(
    "wide_resnet50_2",
    _imagenet("wide_resnet50_2.racm_in1k"),
    stage_sizes=(3, 4, 6, 3),
    base_width=128,
)

# CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, 16/32/64 channels, option A,
# and no zero-init of the last BN (as in the paper; on Fashion-MNIST it trained faster).
for _depth in (8, 20, 32, 44, 56):
    _n = (_depth - 2) // 6
    _register(
        f"resnet{_depth}",
        None,
        stage_sizes=(_n, _n, _n),
        block="basic",
        stage_widths=(16, 32, 64),
        stem="cifar",
        stem_width=16,
        shortcut="pad",
        zero_init_last=False,
        num_classes=10,
    )
