"""`Conv`: `flax.linen.Conv`'s parameters and results (NHWC, HWIO kernel), computed on CPU by
the fastest route for the shape (zoo/cpu/conv.py) and by XLA's native convolution elsewhere.

    y = Conv(64, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False)(x)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from zoo.cpu.conv import conv2d
from zoo.cpu.depthwise import Pads


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
