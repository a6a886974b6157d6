"""zoo's neutral blocks against flax's and JAX's own, under the default CPU policy and each
alternative of its fields: block_input (an identity whose cotangent XLA:CPU computes once),
attention's hand-written backward and batch slices, max_pool's, BatchNorm's and LayerNorm's
gradients, and gelu_exact."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import cpu
from zoo.cpu import CpuPolicy
from zoo.cpu import attention as cpu_attention
from zoo.cpu.norms import batch_norm_train
from zoo.models import layers, norms

DEFAULT = CpuPolicy()


def under(policy, fn):
    """fn jitted with `policy` (None: XLA's native operations): a new function, a new trace."""
    return jax.jit(cpu.traced(lambda *a: fn(*a), policy))


def jaxpr(policy, fn, *args) -> str:
    """fn's jaxpr traced with `policy` (a new function: JAX caches traces by function)."""
    return str(jax.make_jaxpr(cpu.traced(lambda *a: fn(*a), policy))(*args))


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
    np.testing.assert_array_equal(under(DEFAULT, layers.block_input)(x), x)
    # equal to float32 round-off (XLA fuses, and so rounds, the two programs differently)
    ours = under(DEFAULT, jax.grad(residual_chain))(x)
    plain = under(None, jax.grad(plain_chain))(x)
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-6 * float(jnp.abs(plain).max()))
    # a NaN in the cotangent passes through (the conditional's predicate is False then)
    nan_grad = under(DEFAULT, jax.grad(lambda x: jnp.sum(layers.block_input(x) * jnp.nan)))(x)
    assert np.isnan(np.asarray(nan_grad)).all()


def test_cpu_gradient_goes_through_one_conditional_per_block():
    x = jnp.ones((4, 7, 16))

    def conditionals(policy) -> int:
        program = under(policy, jax.grad(residual_chain)).lower(x).compile()
        return program.as_text().count(" conditional(")

    assert conditionals(DEFAULT) == 3  # kept by XLA:CPU's optimisations, one per block
    assert conditionals(CpuPolicy(block_input_gradient_buffer=False)) == 0
    assert conditionals(None) == 0  # XLA's native operations (GPU, TPU)


@pytest.mark.parametrize(
    "size, window, strides, pads",
    [
        (12, (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool
        (9, (3, 3), (2, 2), ((1, 1), (1, 1))),  # odd size
        (8, (2, 3), (1, 2), ((0, 1), (1, 0))),  # uneven window, one-sided pads
    ],
)
def test_max_pool_values_and_gradients_are_flaxs_ties_included(size, window, strides, pads):
    key = jax.random.PRNGKey(0)
    # integers in [-2, 2] after a ReLU: most windows hold their maximum more than once
    x = jax.nn.relu(jnp.round(2 * jax.random.normal(key, (2, size, size, 3))))

    def theirs(x):
        return nn.max_pool(x, window, strides=strides, padding=pads)

    def ours(x):
        return layers.max_pool(x, window, strides, pads)

    y = under(DEFAULT, ours)(x)
    np.testing.assert_array_equal(y, theirs(x))
    grad = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    backward = cpu.traced(lambda x, g: jax.vjp(ours, x)[1](g), DEFAULT)
    assert "custom_vjp" in jaxpr(DEFAULT, ours, x)  # with the hand-written backward
    assert "custom_vjp" not in jaxpr(CpuPolicy(max_pool_vjp=False), ours, x)
    (ours_grad,) = jax.jit(backward)(x, grad)
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
    qkv = jnp.stack([q, k, v])  # as the qkv projection returns it; q's scale applied inside
    return jnp.sum(cpu_attention.qkv_attention(qkv, 0.5, (rel, mask)) * weights)


def dot_product_attention(q, k, v):
    return cpu_attention.qkv_attention(jnp.stack([q, k, v]), 1.0)


def test_attention_backward_equals_jaxs_derivative():
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    q, k, v, weights = (jax.random.normal(key, (4, 3, 10, 8)) for key in keys[:4])
    rel = jax.random.normal(keys[4], (3, 10, 10))  # Swin's relative position bias
    mask = jnp.where(jax.random.uniform(keys[5], (4, 1, 10, 10)) > 0.7, -100.0, 0.0)
    args = (q, k, v, rel, mask, weights)

    def grads(policy):
        value = under(policy, attention_loss)(*args)
        return value, under(policy, jax.grad(attention_loss, argnums=(0, 1, 2, 3)))(*args)

    (ours, ours_grads), (theirs, theirs_grads) = grads(DEFAULT), grads(None)
    _, (_, off_grads) = grads(None), grads(CpuPolicy(attention_vjp=False))
    for a, b in zip(off_grads, theirs_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("flag, transposed_left_dots", [(True, 0), (False, 2)])
def test_attention_gradients_are_plain_batched_matmuls(flag, transposed_left_dots):
    # P^T dO and dS^T Q: JAX's derivative contracts the left operand's row axis (a transposed
    # operand, which YNNPACK refuses); the hand-written one transposes P and dS first.
    x = jnp.ones((2, 3, 49, 32))
    grad = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v) ** 2), (0, 1, 2))
    hlo = under(CpuPolicy(attention_vjp=flag), grad).lower(x, x, x).compile().as_text()
    assert hlo.count("lhs_batch_dims={0,1}, lhs_contracting_dims={2}") == transposed_left_dots


@pytest.mark.parametrize("flag, pads", [(True, 0), (False, 3)])
def test_qkv_gradient_is_one_stack(flag, pads):
    # JAX's cotangent of qkv[0], qkv[1], qkv[2] is three zero-padded copies of qkv summed.
    grad = jax.grad(lambda qkv: jnp.sum(cpu_attention.qkv_attention(qkv, 0.125) ** 2))
    program = jaxpr(CpuPolicy(attention_vjp=flag), grad, jnp.ones((3, 2, 3, 10, 8)))
    assert program.count(" pad[") == pads


def count_dots(policy, fn, *args) -> int:
    return jaxpr(policy, fn, *args).count("dot_general")


def test_attention_in_slices_of_the_batch_equals_the_whole():
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    q, k, v, weights = (jax.random.normal(key, (8, 3, 10, 8)) for key in keys[:4])
    rel = jax.random.normal(keys[4], (3, 10, 10))  # no batch axis: every slice gets it whole
    mask = jnp.where(jax.random.uniform(keys[5], (8, 1, 10, 10)) > 0.7, -100.0, 0.0)
    args = (q, k, v, rel, mask, weights)
    grad = jax.grad(attention_loss, argnums=(0, 1, 2, 3))

    def run(slices, grad_slices):
        policy = CpuPolicy(
            attention_slices=slices,
            attention_gradient_slices=grad_slices,
            min_slice_flops=1,
            min_tokens_for_gradient_slices=1,
        )
        return (
            count_dots(policy, attention_loss, *args),
            count_dots(policy, grad, *args),
            under(policy, attention_loss)(*args),
            under(policy, grad)(*args),
        )

    dots, grad_dots, value, grads = run(4, 2)
    whole_dots, whole_grad_dots, whole_value, whole_grads = run(1, 1)
    assert (dots, whole_dots) == (8, 2)  # q k^T and P v per slice
    # Under differentiation the forward pass stays whole (2 dots); the backward has 4 per slice.
    assert (grad_dots, whole_grad_dots) == (2 + 4 * 2, 2 + 4)
    np.testing.assert_allclose(value, whole_value, rtol=1e-6)
    for a, b in zip(grads, whole_grads, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # fewer tokens than min_tokens_for_gradient_slices (Swin's windows): the gradient is whole
    policy = CpuPolicy(attention_gradient_slices=2, min_slice_flops=1)
    assert (
        count_dots(dataclasses.replace(policy, min_tokens_for_gradient_slices=11), grad, *args)
        == 2 + 4
    )


def test_attention_slices_divide_the_batch_and_carry_enough_work():
    def count(shape, most=16):
        parts = cpu_attention._slices(jnp.zeros(shape), most, DEFAULT.min_slice_flops)
        assert [p.stop - p.start for p in parts] == [shape[0] // len(parts)] * len(parts)
        assert parts[-1].stop == shape[0]
        return len(parts)

    assert count((64, 6, 197, 64)) == 16  # vit_small, batch 64
    assert count((16, 6, 197, 64), most=8) == 8
    assert count((12, 6, 197, 64)) == 12  # 16 does not divide 12
    assert count((7, 6, 197, 64)) == 7
    assert count((1, 6, 197, 64)) == 1  # one image: nothing to slice
    # Swin's first stage at batch 2 (128 windows): 59 MFLOP, at most 7 slices; 4 divides 128
    assert count((128, 3, 49, 32)) == 4
    assert count((8, 3, 10, 8)) == 1  # 19 kFLOP: whole


def test_attention_over_a_batch_sharded_on_8_devices_stays_whole():
    # Slices of a sharded batch cut across shards: XLA moved them between devices.
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    policy = cpu.policy_for(jax.devices(), DEFAULT)
    assert policy.attention_slices == policy.attention_gradient_slices == 1
    assert cpu.policy_for(jax.devices()[:1], DEFAULT).attention_slices == 16
    mesh = jax.sharding.Mesh(jax.devices(), ("data",))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    q = jax.device_put(jnp.ones((64, 6, 197, 64)), batch)  # vit_small: 16 slices on one device
    attend = jax.jit(
        cpu.traced(lambda q: dot_product_attention(q, q, q), policy), out_shardings=batch
    )
    hlo = attend.lower(q).compile().as_text()
    assert hlo.count("collective-permute") == hlo.count("all-to-all") == 0


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_is_flaxs(train):
    x = 3 * jax.random.normal(jax.random.PRNGKey(0), (4, 5, 6, 8)) + 2
    weights = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    ours = norms.BatchNorm(momentum=0.9, epsilon=1e-3)
    theirs = nn.BatchNorm(momentum=0.9, epsilon=1e-3)
    variables = theirs.init(jax.random.PRNGKey(2), x, use_running_average=False)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), x, False)) == jax.tree.map(
        jnp.shape, variables
    )
    params = {
        "scale": jax.random.normal(jax.random.PRNGKey(3), (8,)),
        "bias": jax.random.normal(jax.random.PRNGKey(4), (8,)),
    }
    stats = {"mean": jnp.full((8,), 0.5), "var": jnp.full((8,), 2.0)}

    def loss(module, params, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": stats},
            x,
            use_running_average=not train,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.tanh(y) * weights), (y, updates)

    (ours_value, (ours_y, ours_updates)), ours_grads = under(
        DEFAULT, jax.value_and_grad(lambda p, x: loss(ours, p, x), argnums=(0, 1), has_aux=True)
    )(params, x)
    (_, (theirs_y, theirs_updates)), theirs_grads = jax.value_and_grad(
        lambda p, x: loss(theirs, p, x), argnums=(0, 1), has_aux=True
    )(params, x)
    np.testing.assert_allclose(ours_y, theirs_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(ours_updates), jax.tree.leaves(theirs_updates), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(theirs_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    program = jaxpr(DEFAULT, lambda p: loss(ours, p, x)[0], params)
    assert ("custom_vjp" in program) == train  # the hand-written gradient, when training
    off = jaxpr(CpuPolicy(batch_norm_vjp=False), lambda p: loss(ours, p, x)[0], params)
    native = jaxpr(None, lambda p: loss(ours, p, x)[0], params)
    assert "custom_vjp" not in off and "custom_vjp" not in native
    if train:  # the running averages moved towards this batch's statistics
        assert not np.allclose(ours_updates["batch_stats"]["mean"], stats["mean"])


@pytest.mark.parametrize("shape", [(2, 7, 12), (2, 3, 4, 8)])
def test_layer_norm_is_flaxs(shape):
    x = 4 * jax.random.normal(jax.random.PRNGKey(0), shape) + 3
    weights = jax.random.normal(jax.random.PRNGKey(1), shape)
    ours = norms.layer_norm(1e-5)
    theirs = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
    features = shape[-1]
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(2), x)) == {
        "params": {"scale": (features,), "bias": (features,)}
    }
    params = {
        "scale": 1 + jax.random.normal(jax.random.PRNGKey(3), (features,)),
        "bias": jax.random.normal(jax.random.PRNGKey(4), (features,)),
    }

    def loss(module, params, x):
        y = module.apply({"params": params}, x)
        return jnp.sum(jnp.tanh(y) * weights), y

    ours_grad = under(DEFAULT, jax.grad(lambda p, x: loss(ours, p, x), (0, 1), has_aux=True))
    (ours_grads, ours_y) = ours_grad(params, x)
    theirs_grads, theirs_y = jax.grad(lambda p, x: loss(theirs, p, x), (0, 1), has_aux=True)(
        params, x
    )
    np.testing.assert_allclose(ours_y, theirs_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(theirs_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    assert "custom_vjp" in jaxpr(DEFAULT, lambda p: loss(ours, p, x)[0], params)
    # bfloat16, the field off and other backends are flax's own
    bf16 = jaxpr(DEFAULT, lambda p: loss(ours, p, x.astype(jnp.bfloat16))[0], params)
    assert "custom_vjp" not in bf16
    off = CpuPolicy(layer_norm_vjp=False)
    assert "custom_vjp" not in jaxpr(off, lambda p: loss(ours, p, x)[0], params)
    assert "custom_vjp" not in jaxpr(None, lambda p: loss(ours, p, x)[0], params)


def test_batch_norm_statistics_gradients_are_flaxs():
    # the statistics' cotangents (zero in a train step) are not dropped
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 5))
    scale, bias = jnp.full((5,), 1.5), jnp.full((5,), -0.5)

    def through_stats(x):
        y, mean, var = batch_norm_train(x, scale, bias, 1e-5)
        return jnp.sum(y**2) + jnp.sum(mean * jnp.arange(5.0)) + jnp.sum(var**2)

    def reference(x):
        mean = x.mean((0, 1, 2))
        var = jnp.maximum((x * x).mean((0, 1, 2)) - mean**2, 0.0)
        y = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
        return jnp.sum(y**2) + jnp.sum(mean * jnp.arange(5.0)) + jnp.sum(var**2)

    np.testing.assert_allclose(
        jax.grad(through_stats)(x), jax.grad(reference)(x), rtol=1e-4, atol=1e-5
    )
