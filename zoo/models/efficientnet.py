"""EfficientNet B0-B7 and EfficientNet-Lite0-4 (as in timm), in PyTorch and TensorFlow flavours.

Papers: Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks" (compound scaling of width and depth from the B0 block table below); the Lite
variants are Google's edge versions (tensorflow/tpu `efficientnet/lite`): ReLU6, no
squeeze-excite, stem and head not scaled, first and last stage depth not scaled.

    model = zoo.create_model("efficientnet_b0", num_classes=10, drop_path_rate=0.2)
    variables = model.init(rng, jnp.zeros((1, 224, 224, 3)), train=False)
    logits = model.apply(variables, images, train=False)  # [B, 10] float32

`tf_*` variants are the ports of the original TensorFlow weights: TensorFlow "SAME" padding
(asymmetric for stride 2: pads (0, 1) on an even input) and BatchNorm epsilon 1e-3 / decay
0.99 as in the TF training code. `efficientnet_*` pad symmetrically like torch, with
BatchNorm epsilon 1e-5 / torch momentum 0.1 (timm's own training).

Submodules follow timm's state_dict names (`blocks.1.0.conv_pw` <-> `blocks_1_0/conv_pw`).
`efficientnet_from_timm` also reads the naming of the `efficientnet_pytorch` library
(`_blocks.3._expand_conv`, ...), detected by its key names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.models.conv import Conv
from zoo.models.layers import Dropout, DropPath, SqueezeExcite, global_avg_pool
from zoo.models.norms import BatchNorm
from zoo.models.registry import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    SMALL_IMAGE_32,
    PretrainedConfig,
    register_variant,
)
from zoo.models.weights import torch_to_flax

# EfficientNet-B0 (the paper's table 1), one row per stage:
# (block, repeats, kernel, stride, expand ratio, output channels).
# "ds": depthwise-separable (dw conv -> SE -> pw conv); "ir": inverted residual (MBConv).
B0_STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)

ACTIVATIONS = {"swish": nn.swish, "relu6": nn.relu6, "relu": nn.relu}


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of `divisor` (at least `divisor`), never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block after compound scaling; `stage`/`index` give its name `blocks_{stage}_{index}`."""

    stage: int
    index: int
    kind: str  # "ds" or "ir"
    kernel: int
    stride: int
    expand_ratio: int
    in_features: int
    out_features: int
    se_features: int  # reduced channels of squeeze-excite; 0 = none
    drop_path_rate: float


def conv_init(groups: int = 1):
    # timm: normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups; flax's fan_out does
    # not divide by groups, so the scale does.
    return nn.initializers.variance_scaling(2.0 * groups, "fan_out", "normal")


class DepthwiseSeparable(nn.Module):
    """Depthwise conv -> BN/act -> squeeze-excite -> pointwise conv -> BN (+ residual)."""

    spec: BlockSpec
    conv: Any
    norm: Any
    act: Any
    axis_name: str | None = None  # the pmap axis of the batch: per-example drop-path masks
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        s = self.spec
        y = self.conv(s.in_features, s.kernel, s.stride, groups=s.in_features, name="conv_dw")(x)
        y = self.act(self.norm(name="bn1")(y))
        if s.se_features:
            y = squeeze_excite(self, s.se_features)(y)
        y = self.conv(s.out_features, 1, name="conv_pw")(y)
        y = self.norm(name="bn2")(y)
        return residual(s, x, y, train, self.axis_name)


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expand -> BN/act -> depthwise -> BN/act -> squeeze-excite -> 1x1 project
    -> BN (+ residual with drop-connect)."""

    spec: BlockSpec
    conv: Any
    norm: Any
    act: Any
    axis_name: str | None = None  # the pmap axis of the batch: per-example drop-path masks
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        s = self.spec
        mid = make_divisible(s.in_features * s.expand_ratio)
        y = self.act(self.norm(name="bn1")(self.conv(mid, 1, name="conv_pw")(x)))
        y = self.conv(mid, s.kernel, s.stride, groups=mid, name="conv_dw")(y)
        y = self.act(self.norm(name="bn2")(y))
        if s.se_features:
            y = squeeze_excite(self, s.se_features)(y)
        y = self.conv(s.out_features, 1, name="conv_pwl")(y)
        y = self.norm(name="bn3")(y)
        return residual(s, x, y, train, self.axis_name)


def squeeze_excite(block: nn.Module, reduced: int) -> SqueezeExcite:
    return SqueezeExcite(
        reduced,
        act=block.act,
        kernel_init=conv_init(),
        dtype=block.dtype,
        param_dtype=block.param_dtype,
        name="se",
    )


def residual(
    spec: BlockSpec, x: jax.Array, y: jax.Array, train: bool, axis_name: str | None
) -> jax.Array:
    if spec.stride == 1 and spec.in_features == spec.out_features:
        return x + DropPath(spec.drop_path_rate, axis_name)(y, train=train)  # "drop-connect"
    return y


class EfficientNet(nn.Module):
    """EfficientNet / EfficientNet-Lite: stem, the scaled B0 stages, 1x1 head conv, linear.

    Attributes:
      width_multiplier: channel scaling (B0: 1.0 ... B7: 2.0), rounded to multiples of 8.
      depth_multiplier: repeats scaling (B0: 1.0 ... B7: 3.1), rounded up per stage.
      num_classes: classes of the head; 0 returns pooled features [B, head_features].
      lite: the Lite rules: stem and head widths fixed, first and last stage depth fixed.
      se_ratio: squeeze-excite reduction relative to each block's input channels; 0 = none.
      activation: "swish" (EfficientNet) or "relu6" (Lite).
      padding: "symmetric" (torch) or "same" (TensorFlow, for the `tf_*` weights).
      stem_features, head_features: widths before scaling.
      stem_stride: stride of the 3x3 stem convolution; 1 keeps the input's resolution, the
        usual adaptation to 32 px images (the last stage then sees 2x2 instead of 1x1).
      drop_rate: dropout before the classifier (the paper: 0.2 for B0 ... 0.5 for B7).
      drop_path_rate: drop-connect, increased linearly over blocks (the paper: 0.2).
      bn_momentum, bn_epsilon: BatchNorm running-average decay and epsilon.
      axis_name: the `pmap` axis the batch is split over: BatchNorm statistics over the global
        batch, dropout and drop-connect masks keyed by the global example index; None under
        `jit`, where arrays are global already.
    """

    width_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    num_classes: int = 1000
    lite: bool = False
    se_ratio: float = 0.25
    activation: str = "swish"
    padding: str = "symmetric"
    stem_features: int = 32
    head_features: int = 1280
    stem_stride: int = 2
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def widths(self) -> tuple[int, int]:
        """(stem, head) output channels after scaling."""
        if self.lite:
            return self.stem_features, self.head_features
        return self.scale_width(self.stem_features), self.scale_width(self.head_features)

    def scale_width(self, channels: int) -> int:
        return make_divisible(channels * self.width_multiplier)

    def block_specs(self) -> list[BlockSpec]:
        """Every block of the network, compound-scaled from `B0_STAGES`."""
        rows = []
        for stage, (kind, repeats, kernel, stride, expand, out) in enumerate(B0_STAGES):
            fixed = self.lite and stage in (0, len(B0_STAGES) - 1)
            depth = repeats if fixed else math.ceil(repeats * self.depth_multiplier)
            rows += [
                (stage, j, kind, kernel, stride if j == 0 else 1, expand, out) for j in range(depth)
            ]
        specs, in_features = [], self.widths()[0]
        for i, (stage, j, kind, kernel, stride, expand, out) in enumerate(rows):
            out = self.scale_width(out)
            base = in_features if kind == "ds" else make_divisible(in_features * expand)
            # timm divides the ratio by the expansion first; same float steps, same rounding.
            se = round(base * (self.se_ratio / expand)) if self.se_ratio else 0
            rate = self.drop_path_rate * i / len(rows)
            specs.append(
                BlockSpec(stage, j, kind, kernel, stride, expand, in_features, out, se, rate)
            )
            in_features = out
        return specs

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.padding not in ("symmetric", "same"):
            raise ValueError(f"padding must be 'symmetric' or 'same', got '{self.padding}'")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got '{self.activation}'"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = ACTIVATIONS[self.activation]
        norm = functools.partial(
            BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            axis_name=self.axis_name,
            **kw,
        )

        def conv(features: int, kernel: int, strides: int = 1, groups: int = 1, **names):
            pad = "SAME" if self.padding == "same" else [(kernel // 2, kernel // 2)] * 2
            return Conv(
                features,
                (kernel, kernel),
                strides=(strides, strides),
                padding=pad,
                feature_group_count=groups,
                use_bias=False,
                kernel_init=conv_init(groups),
                **kw,
                **names,
            )

        stem, head = self.widths()
        x = x.astype(self.dtype)
        x = conv(stem, 3, self.stem_stride, name="conv_stem")(x)  # [B, H/s, W/s, C]
        x = act(norm(name="bn1")(x))
        for spec in self.block_specs():
            block = DepthwiseSeparable if spec.kind == "ds" else InvertedResidual
            name = f"blocks_{spec.stage}_{spec.index}"
            x = block(spec, conv, norm, act, self.axis_name, name=name, **kw)(x, train=train)
        x = act(norm(name="bn2")(conv(head, 1, name="conv_head")(x)))
        x = global_avg_pool(x)  # [B, C]
        if self.num_classes == 0:
            return x.astype(jnp.float32)
        x = Dropout(self.drop_rate, self.axis_name)(x, train=train)
        # timm: uniform(+-1/sqrt(fan_out)) for the classifier.
        dense_init = nn.initializers.variance_scaling(1 / 3, "fan_out", "uniform")
        x = nn.Dense(self.num_classes, kernel_init=dense_init, name="classifier", **kw)(x)
        return x.astype(jnp.float32)


# --------------------------------------------------------------------------- timm weights

# efficientnet_pytorch (lukemelas) names -> timm names, per block kind.
_LIBRARY_BLOCK_NAMES = {
    "ir": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
    "ds": {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    },
}
_LIBRARY_TOP_NAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def _library_to_timm(state_dict: dict[str, np.ndarray], model: EfficientNet) -> dict[str, Any]:
    """`_blocks.{i}.{name}` (one flat block index) -> `blocks.{stage}.{index}.{timm name}`."""
    specs = model.block_specs()
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            if i >= len(specs):
                raise ValueError(f"'{key}': the model has only {len(specs)} blocks")
            spec = specs[i]
            names = _LIBRARY_BLOCK_NAMES[spec.kind]
            if parts[2] not in names:
                raise ValueError(f"unexpected efficientnet_pytorch key '{key}' ({spec.kind} block)")
            key = ".".join(
                ["blocks", str(spec.stage), str(spec.index), names[parts[2]], *parts[3:]]
            )
        elif parts[0] in _LIBRARY_TOP_NAMES:
            key = ".".join([_LIBRARY_TOP_NAMES[parts[0]], *parts[1:]])
        else:
            raise ValueError(f"unexpected efficientnet_pytorch key '{key}'")
        out[key] = value
    return out


def efficientnet_from_timm(
    state_dict: dict[str, np.ndarray], model: nn.Module | None = None
) -> dict[str, Any]:
    """timm (or efficientnet_pytorch) EfficientNet state_dict -> flax {'params', 'batch_stats'}.

    Besides the generic renaming (`zoo.models.weights.torch_to_flax`), the squeeze-excite
    1x1 conv weights [out, in, 1, 1] become dense kernels. A state_dict in the naming of the
    `efficientnet_pytorch` library (keys `_conv_stem.weight`, `_blocks.0...`) is recognised by
    its keys and renamed to timm's first; that needs `model` for the stage layout.
    """
    if any(key.startswith(("_conv_stem.", "_blocks.")) for key in state_dict):
        if model is None:
            raise ValueError("efficientnet_pytorch weights need the model to map block indices")
        state_dict = _library_to_timm(state_dict, model)

    def rename(key: str, value: np.ndarray):
        if ".se.conv_" in key and value.ndim == 4:
            value = value[:, :, 0, 0]
        return key, value

    return torch_to_flax(state_dict, rename)


# --------------------------------------------------------------------------- variants


def _pretrained(timm_name, size, crop_pct, interpolation="bicubic", inception=False):
    return PretrainedConfig(
        input_size=(size, size, 3),
        crop_pct=crop_pct,
        interpolation=interpolation,
        timm_name=timm_name,  # "" when timm has no weights for this name
        license="apache-2.0",
        **(dict(mean=INCEPTION_MEAN, std=INCEPTION_STD) if inception else {}),
    )


def _register(name: str, pretrained: PretrainedConfig, **defaults):
    register_variant(
        name,
        EfficientNet,
        defaults,
        pretrained=pretrained,
        from_timm=efficientnet_from_timm,
        head=("classifier",),
    )


# name: (width, depth), then timm's default weights: (tag or "", input size, crop_pct).
_EFFICIENTNET = {
    "b0": ((1.0, 1.0), ("ra_in1k", 224, 0.875), ("ns_jft_in1k", 224, 0.875)),
    "b1": ((1.0, 1.1), ("ra4_e3600_r240_in1k", 240, 0.9), ("ns_jft_in1k", 240, 0.882)),
    "b2": ((1.1, 1.2), ("ra_in1k", 256, 0.875), ("ns_jft_in1k", 260, 0.89)),
    "b3": ((1.2, 1.4), ("ra2_in1k", 288, 0.875), ("ns_jft_in1k", 300, 0.904)),
    "b4": ((1.4, 1.8), ("ra2_in1k", 320, 0.875), ("ns_jft_in1k", 380, 0.922)),
    "b5": ((1.6, 2.2), ("sw_in12k_ft_in1k", 448, 1.0), ("ns_jft_in1k", 456, 0.934)),
    "b6": ((1.8, 2.6), ("", 528, 0.942), ("ns_jft_in1k", 528, 0.942)),
    "b7": ((2.0, 3.1), ("", 600, 0.949), ("ns_jft_in1k", 600, 0.949)),
}
_LITE = {
    "lite0": ((1.0, 1.0), ("ra_in1k", 224, 0.875), (224, 0.875, "bicubic")),
    "lite1": ((1.0, 1.1), ("", 240, 0.882), (240, 0.882, "bicubic")),
    "lite2": ((1.1, 1.2), ("", 260, 0.89), (260, 0.89, "bicubic")),
    "lite3": ((1.2, 1.4), ("", 300, 0.904), (300, 0.904, "bilinear")),
    "lite4": ((1.4, 1.8), ("", 380, 0.922), (380, 0.92, "bilinear")),
}
_TF = dict(padding="same", bn_epsilon=1e-3, bn_momentum=0.99)
_LITE_ARGS = dict(lite=True, se_ratio=0.0, activation="relu6")


def _timm_name(name, tag):
    return f"{name}.{tag}" if tag else ""


for _key, ((_w, _d), (_tag, _size, _crop), (_tf_tag, _tf_size, _tf_crop)) in _EFFICIENTNET.items():
    _name = f"efficientnet_{_key}"
    _inception = _key == "b1"  # timm's ra4 B1 weights were trained with mean = std = 0.5
    _register(
        _name,
        _pretrained(_timm_name(_name, _tag), _size, _crop, inception=_inception),
        width_multiplier=_w,
        depth_multiplier=_d,
    )
    _register(
        f"tf_{_name}",
        _pretrained(f"tf_{_name}.{_tf_tag}", _tf_size, _tf_crop),
        width_multiplier=_w,
        depth_multiplier=_d,
        **_TF,
    )

for _key, ((_w, _d), (_tag, _size, _crop), (_tf_size, _tf_crop, _tf_interp)) in _LITE.items():
    _name = f"efficientnet_{_key}"
    _register(
        _name,
        _pretrained(_timm_name(_name, _tag), _size, _crop),
        width_multiplier=_w,
        depth_multiplier=_d,
        **_LITE_ARGS,
    )
    # Google's TF-Lite weights take inputs in [-1, 1].
    _register(
        f"tf_{_name}",
        _pretrained(f"tf_{_name}.in1k", _tf_size, _tf_crop, _tf_interp, inception=True),
        width_multiplier=_w,
        depth_multiplier=_d,
        **_LITE_ARGS,
        **_TF,
    )

# zoo's own 32 px variant (no timm counterpart, no weights) for small-image datasets: B0 with
# a stride-1 stem, so that its five stride-2 stages end on a 2x2 map at 32 px, not 1x1.
_register("efficientnet_b0_stem1_32", SMALL_IMAGE_32, stem_stride=1, num_classes=10)
