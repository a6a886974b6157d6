"""EfficientNet / EfficientNet-Lite: timm's logits after conversion, for randomised weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm  # the [convert] extra; a missing install must fail, not skip
import torch
from timm_parity import logit_diff

import zoo
from zoo.models.efficientnet import make_divisible

# Even sides all the way down (64 -> 32 -> ... -> 2), so TensorFlow "SAME" padding of the
# tf_* variants is asymmetric at every stride-2 layer, where a torch-style pad would differ.
SIZE = 64


def randomised_timm(name: str) -> torch.nn.Module:
    """timm model in eval mode with random BatchNorm affine parameters and running statistics
    (fresh ones are the identity, which would hide a wrong epsilon or a missing statistic),
    random biases, and a unit-scale classifier so that logits are O(10)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.3, 0.7)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 1.0)
                module.bias.normal_(0.0, 0.1)
            elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)  # squeeze-excite
    return model


@pytest.mark.parametrize(
    "name",
    [
        "efficientnet_b0",
        "tf_efficientnet_b0",
        "tf_efficientnet_lite0",
        pytest.param("efficientnet_lite0", marks=pytest.mark.slow),
        pytest.param("efficientnet_b2", marks=pytest.mark.slow),  # width 1.1: rounding
        pytest.param("tf_efficientnet_b3", marks=pytest.mark.slow),
        pytest.param("tf_efficientnet_lite4", marks=pytest.mark.slow),  # fixed first/last depth
    ],
)
def test_logits_match_timm(name):
    assert logit_diff(name, randomised_timm(name), SIZE, min_scale=1.0) <= 1e-4


def test_make_divisible_as_timm():
    from timm.layers import make_divisible as timm_make_divisible

    for value in [3.2, 16, 17.6, 35.2, 44.8, 57.6, 100.0, 1280 * 1.1, 1280 * 1.8, 320 * 2.0]:
        assert make_divisible(value) == timm_make_divisible(value)


def test_tf_variants_use_tensorflow_batchnorm_and_padding():
    model = zoo.create_model("tf_efficientnet_b0")
    assert (model.padding, model.bn_epsilon, model.bn_momentum) == ("same", 1e-3, 0.99)
    lite = zoo.create_model("efficientnet_lite3")
    assert (lite.activation, lite.se_ratio, lite.widths()) == ("relu6", 0.0, (32, 1280))
    specs = lite.block_specs()
    assert [s.stage for s in specs].count(0) == 1 and [s.stage for s in specs].count(6) == 1


def test_batchnorm_statistics_update_in_training_only():
    model = zoo.create_model("efficientnet_lite0", num_classes=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.0, s.shape), s.dtype), shapes)

    @jax.jit
    def run(variables):
        evaluated = model.apply(variables, x, train=False)
        trained, updates = model.apply(
            variables,
            x,
            train=True,
            rngs={"dropout": jax.random.PRNGKey(1)},
            mutable=["batch_stats"],
        )
        return evaluated, trained, updates

    evaluated, trained, updates = run(variables)
    assert evaluated.shape == trained.shape == (2, 3)
    old = variables["batch_stats"]["bn1"]["mean"]
    new = updates["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(old, new)


def test_stride_one_stem_keeps_the_resolution():
    """efficientnet_b0_stem1_32: the stem keeps 32 px, so the last stage sees 2x2, not 1x1."""
    model = zoo.create_model("efficientnet_b0_stem1_32")
    x = jnp.zeros((1, 32, 32, 3))

    def run():  # shapes only (eval_shape): nothing is compiled
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        return model.apply(variables, x, train=False, capture_intermediates=True)

    logits, state = jax.eval_shape(run)
    outputs = state["intermediates"]
    assert outputs["conv_stem"]["__call__"][0].shape == (1, 32, 32, 32)
    assert outputs["conv_head"]["__call__"][0].shape == (1, 2, 2, 1280)
    assert logits.shape == (1, 10)
