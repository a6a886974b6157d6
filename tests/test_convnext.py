"""ConvNeXt: timm's logits after conversion, for randomised timm weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm  # the [convert] extra; a missing install must fail, not skip
import torch
from timm_parity import logit_diff

import zoo

SIZE = 64


def randomised_timm(name: str) -> torch.nn.Module:
    """timm model in eval mode, every parameter perturbed: LayerScale starts at 1e-6, which
    would hide a wrong block behind the residual, and norms start at the identity."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.mark.parametrize(
    "name",
    [
        "convnext_atto",  # conv_mlp (1x1-conv MLP weights)
        "convnext_tiny",
        pytest.param("convnext_nano", marks=pytest.mark.slow),
        pytest.param("convnext_small", marks=pytest.mark.slow),
    ],
)
def test_logits_match_timm(name):
    assert logit_diff(name, randomised_timm(name), SIZE) <= 1e-4


def random_variables(model, x):
    """Variables of `model` filled from numpy: `model.init` spends ~20 s compiling its RNG."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes)


def test_features_are_the_normalised_pooled_map():
    model = zoo.create_model("convnext_atto", num_classes=0)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    variables = random_variables(model, x)
    head_norm = variables["params"]["head_norm"]
    head_norm = {
        "scale": jnp.ones_like(head_norm["scale"]),
        "bias": jnp.zeros_like(head_norm["bias"]),
    }
    variables["params"]["head_norm"] = head_norm
    features = jax.jit(model.apply, static_argnames="train")(variables, x, train=False)
    assert features.shape == (2, 320)
    np.testing.assert_allclose(np.asarray(features.mean(-1)), 0.0, atol=1e-5)  # LayerNorm


def test_stochastic_depth_only_in_training():
    model = zoo.create_model("convnext_atto", num_classes=3, drop_path_rate=0.5)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    variables = random_variables(model, x)

    @jax.jit
    def run(variables, key):
        evaluated = model.apply(variables, x, train=False)
        trained = model.apply(variables, x, train=True, rngs={"dropout": key})
        return evaluated, trained

    eval_a, train_a = run(variables, jax.random.PRNGKey(2))
    eval_b, train_b = run(variables, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, train_b)


def test_stem2_variant_ends_on_a_2x2_map_at_32_px():
    model = zoo.create_model("convnext_atto_stem2_32")
    x = jnp.zeros((1, 32, 32, 3))

    def run():  # shapes only (eval_shape): nothing is compiled
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        return model.apply(variables, x, train=False, capture_intermediates=True)

    logits, state = jax.eval_shape(run)
    outputs = state["intermediates"]
    assert outputs["stem_0"]["__call__"][0].shape == (1, 16, 16, 40)
    assert outputs["stages_3"]["__call__"][0].shape == (1, 2, 2, 320)
    assert logits.shape == (1, 10)
