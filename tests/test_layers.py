"""zoo.models.layers: block_input (an identity whose cotangent XLA:CPU computes once),
dot_product_attention's hand-written backward, max_pool's, and gelu_exact."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.models import layers


def residual_chain(x):
    # Blocks of x + f(layer_norm-like(x)): the gradient chain block_input cuts into pieces.
    for scale in (0.5, 2.0, 3.0):
        x = layers.block_input(x)
        centred = x - x.mean(-1, keepdims=True)
        x = x + scale * jnp.tanh(centred / jnp.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6))
    return jnp.sum(x * jnp.arange(x.shape[-1]))


def plain_chain(x):
    for scale in (0.5, 2.0, 3.0):
        centred = x - x.mean(-1, keepdims=True)
        x = x + scale * jnp.tanh(centred / jnp.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6))
    return jnp.sum(x * jnp.arange(x.shape[-1]))


def test_values_and_gradients_are_the_identitys():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 7, 16))
    np.testing.assert_array_equal(layers.block_input(x), x)
    # equal to float32 round-off (XLA fuses, and so rounds, the two programs differently)
    ours, plain = jax.jit(jax.grad(residual_chain))(x), jax.jit(jax.grad(plain_chain))(x)
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-6 * float(jnp.abs(plain).max()))
    # a NaN in the cotangent passes through (the conditional's predicate is False then)
    nan_grad = jax.grad(lambda x: jnp.sum(layers.block_input(x) * jnp.nan))(x)
    assert np.isnan(np.asarray(nan_grad)).all()


def test_cpu_gradient_goes_through_one_conditional_per_block(monkeypatch):
    x = jnp.ones((4, 7, 16))

    def conditionals() -> int:
        return jax.jit(jax.grad(residual_chain)).lower(x).compile().as_text().count(" conditional(")

    assert jax.default_backend() == "cpu"
    assert conditionals() == 3  # kept by XLA:CPU's optimisations, one per block
    monkeypatch.setattr(layers, "MATERIALIZE_BLOCK_GRADIENTS", False)
    assert conditionals() == 0


@pytest.mark.parametrize(
    "size, window, strides, pads",
    [
        (12, (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool
        (9, (3, 3), (2, 2), ((1, 1), (1, 1))),  # odd size
        (8, (2, 3), (1, 2), ((0, 1), (1, 0))),  # uneven window, one-sided pads
    ],
)
def test_max_pool_values_and_gradients_are_flaxs_ties_included(size, window, strides, pads):
    assert jax.default_backend() == "cpu"  # the hand-written path
    key = jax.random.PRNGKey(0)
    # integers in [-2, 2] after a ReLU: most windows hold their maximum more than once
    x = jax.nn.relu(jnp.round(2 * jax.random.normal(key, (2, size, size, 3))))

    def theirs(x):
        return nn.max_pool(x, window, strides=strides, padding=pads)

    def ours(x):
        return layers.max_pool(x, window, strides, pads)

    y = ours(x)
    np.testing.assert_array_equal(y, theirs(x))
    grad = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    (ours_grad,) = jax.jit(lambda x, g: jax.vjp(ours, x)[1](g))(x, grad)
    (theirs_grad,) = jax.vjp(theirs, x)[1](grad)
    # each output's gradient lands on the first maximum in its window, exactly as XLA's
    assert float((x == 0).mean()) > 0.4
    np.testing.assert_array_equal(ours_grad, theirs_grad)


def test_gelu_exact_matches_float64_erf_reference_and_flax():
    x = np.concatenate([np.linspace(-12, 12, 2001), [-40.0, -5.5, 0.0, 3.25, 40.0]])
    reference = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    slope = np.array(
        [
            0.5 * (1 + math.erf(v / math.sqrt(2)))
            + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
            for v in x
        ]
    )
    xs = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(layers.gelu_exact(xs), reference, rtol=1e-6, atol=1e-6)
    grad = jax.vmap(jax.grad(layers.gelu_exact))(xs)
    np.testing.assert_allclose(grad, slope, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        layers.gelu_exact(xs), nn.gelu(xs, approximate=False), rtol=1e-6, atol=1e-6
    )
    assert layers.gelu_exact(xs.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def attention_loss(q, k, v, rel, mask, weights):
    return jnp.sum(layers.dot_product_attention(q, k, v, (rel, mask)) * weights)


def test_attention_backward_equals_jaxs_derivative(monkeypatch):
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    q, k, v, weights = (jax.random.normal(key, (4, 3, 10, 8)) for key in keys[:4])
    rel = jax.random.normal(keys[4], (3, 10, 10))  # Swin's relative position bias
    mask = jnp.where(jax.random.uniform(keys[5], (4, 1, 10, 10)) > 0.7, -100.0, 0.0)
    args = (q, k, v, rel, mask, weights)

    def grads(flag):  # traced afresh: the switch is read when tracing
        monkeypatch.setattr(layers, "ATTENTION_VJP", flag)
        value = attention_loss(*args)
        return value, jax.jit(jax.grad(attention_loss, argnums=(0, 1, 2, 3)))(*args)

    (ours, ours_grads), (theirs, theirs_grads) = grads(True), grads(False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("flag, transposed_left_dots", [(True, 0), (False, 2)])
def test_attention_gradients_are_plain_batched_matmuls(monkeypatch, flag, transposed_left_dots):
    # P^T dO and dS^T Q: JAX's derivative contracts the left operand's row axis (a transposed
    # operand, which YNNPACK refuses); the hand-written one transposes P and dS first.
    monkeypatch.setattr(layers, "ATTENTION_VJP", flag)
    x = jnp.ones((2, 3, 49, 32))
    grad = jax.grad(lambda q, k, v: jnp.sum(layers.dot_product_attention(q, k, v) ** 2), (0, 1, 2))
    hlo = jax.jit(grad).lower(x, x, x).compile().as_text()
    assert hlo.count("lhs_batch_dims={0,1}, lhs_contracting_dims={2}") == transposed_left_dots
