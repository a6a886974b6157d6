"""ViT/DeiT specifics beyond the generic registry tests: position embedding resizing, pooling
options, the distillation head, bfloat16 compute. Tiny depths keep these cheap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.models.vit import resize_pos_embed

TINY = dict(depth=1)  # vit_tiny dims (192 wide, 3 heads), 1 block


def init(model, size, seed=0):
    # jit: one XLA compile of a small model is cheaper than compiling each eager op.
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, size, size, 3))
    return jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(seed), x, train=False), x


def apply(model, variables, x, train=False):
    return jax.jit(model.apply, static_argnames="train")(variables, x, train=train)


def test_pos_embed_resize_is_identity_at_same_size_and_torch_bicubic_otherwise():
    pos = jax.random.normal(jax.random.PRNGKey(0), (1, 14 * 14, 8))
    assert resize_pos_embed(pos, (14, 14)) is pos
    resized = resize_pos_embed(pos, (24, 20))
    grid = torch.from_numpy(np.array(pos)).reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(24, 20), mode="bicubic", antialias=True)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 24 * 20, 8).numpy()
    np.testing.assert_allclose(np.asarray(resized), expected, atol=1e-5)


def test_avg_pool_sincos_layerscale_options():
    model = zoo.create_model(
        "vit_tiny_patch16_224",
        global_pool="avg",
        class_token=False,
        pos_embed="sincos",
        init_values=1e-5,
        num_classes=3,
        **TINY,
    )
    variables, x = init(model, 48)
    params = variables["params"]
    assert "fc_norm" in params and "norm" not in params and "pos_embed" not in params
    assert params["blocks_0"]["ls1"]["gamma"].shape == (192,)
    assert apply(model, variables, x).shape == (2, 3)
    with pytest.raises(ValueError, match="class_token"):
        jax.eval_shape(
            lambda: zoo.create_model("vit_tiny_patch16_224", class_token=False).init(
                jax.random.PRNGKey(0), x, train=False
            )
        )


def test_distilled_heads_average_at_inference_and_split_in_distilled_training():
    model = zoo.create_model(
        "deit_base_distilled_patch16_224",
        embed_dim=64,
        num_heads=2,
        num_classes=4,
        distilled_training=True,
        **TINY,
    )
    variables, x = init(model, 32)
    cls_logits, dist_logits = apply(model, variables, x, train=True)  # no dropout configured
    averaged = apply(model, variables, x)
    np.testing.assert_allclose(averaged, (cls_logits + dist_logits) / 2, atol=1e-6)
    params = {k: v for k, v in variables["params"].items() if "head" not in k}
    features = apply(model.clone(num_classes=0), {"params": params}, x)
    assert features.shape == (2, 64)


def test_bfloat16_compute_stays_close_to_float32():
    model = zoo.create_model("vit_tiny_patch16_224", **TINY)
    variables, x = init(model, 64)
    full = apply(model, variables, x)
    half = apply(model.clone(dtype=jnp.bfloat16), variables, x)
    assert half.dtype == jnp.float32
    # bfloat16 keeps 8 mantissa bits (~0.4% relative): allow 3% of the logit range.
    assert float(jnp.max(jnp.abs(half - full))) <= 0.03 * float(jnp.max(jnp.abs(full)))
