"""What a model costs: its parameter count and its forward FLOPs per image.

    model = zoo.create_model("resnet20", num_classes=10)
    parameter_count(model, (32, 32, 3))  # 269,722
    forward_flops(model, (32, 32, 3))  # ~75e6: XLA's count for one 32x32x3 image, eval mode

FLOPs are XLA's cost analysis of the compiled eval-mode forward at batch 1, traced with XLA's
native operations (no CPU policy: zoo/cpu's routes, e.g. Winograd convolutions, would change the
count but not the architecture), so a multiply-add counts 2 and the figure is the same on every
backend. Nothing is initialised or run: shapes come from `jax.eval_shape`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo import cpu


def _variable_shapes(model: nn.Module, image_shape: Sequence[int]) -> Any:
    image = jnp.zeros((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, train=False))


def parameter_count(model: nn.Module, image_shape: Sequence[int]) -> int:
    """Trainable parameters of `model` on images of `image_shape` (H, W, C): the count can
    depend on the input's channels (the stem) and, for a ViT, on its position-embedding grid."""
    shapes = _variable_shapes(model, image_shape)
    return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))


def forward_flops(model: nn.Module, image_shape: Sequence[int]) -> float:
    """FLOPs of one eval-mode forward pass of one image of `image_shape` (H, W, C), from
    XLA's cost analysis of the compiled program (see the module docstring)."""
    variables = _variable_shapes(model, image_shape)
    image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    forward = jax.jit(cpu.traced(lambda v, x: model.apply(v, x, train=False), None))
    return compiled_flops(forward.lower(variables, image).compile())


def compiled_flops(compiled: Any) -> float:
    """The FLOPs of a compiled program by XLA's cost analysis (0 where it has no count)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))
