"""zoo.models.conv.Conv == flax's nn.Conv: outputs, gradients and parameters, every route of
zoo/cpu/conv.py, under the default CPU policy and each alternative of its convolution fields."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import cpu
from zoo.cpu import CpuPolicy, winograd
from zoo.cpu import conv as cpu_conv
from zoo.cpu import matmul as cpu_matmul
from zoo.models import conv

CASES = [  # (in, out, kernel, stride, padding, groups, size): each of conv2d's paths
    (5, 7, 3, 1, ((1, 1), (1, 1)), 1, 9),  # k x k: matmul weight gradient
    (64, 72, 3, 1, ((1, 1), (1, 1)), 1, 9),  # 3x3 at stride 1, >= 64 channels: Winograd
    (72, 64, 3, 1, "SAME", 1, 4),  # Winograd, even size
    (5, 7, 3, 2, ((1, 1), (1, 1)), 1, 9),  # strided, odd size
    (4, 6, 3, 2, "SAME", 1, 8),  # asymmetric SAME padding
    (3, 8, 7, 2, ((3, 3), (3, 3)), 1, 11),  # ResNet stem
    (6, 5, 1, 1, "VALID", 1, 7),  # 1x1: matmul
    (6, 5, 1, 2, ((0, 0), (0, 0)), 1, 7),  # strided 1x1 (ResNet downsample)
    (3, 8, 4, 4, "VALID", 1, 10),  # patchify (non-divisible size is cropped)
    (8, 8, 7, 1, ((3, 3), (3, 3)), 8, 9),  # depthwise 7x7 (ConvNeXt): custom VJP
    (8, 8, 4, 1, "SAME", 8, 9),  # depthwise, asymmetric padding: custom VJP
    (8, 8, 3, 1, ((2, 0), (0, 1)), 8, 7),  # depthwise, one-sided padding: custom VJP
    (8, 8, 3, 1, ((3, 1), (1, 1)), 8, 7),  # depthwise, padding beyond the kernel's reach
    (8, 8, 3, 2, ((1, 1), (1, 1)), 8, 9),  # strided depthwise (EfficientNet): custom VJP
    (8, 8, 3, 2, ((1, 1), (1, 1)), 8, 10),  # strided depthwise, last row in no window
    (8, 8, 5, 2, "SAME", 8, 10),  # depthwise SAME (tf_efficientnet)
    (8, 12, 3, 1, ((1, 1), (1, 1)), 4, 7),  # grouped (ResNeXt): XLA
]


DEFAULT = CpuPolicy()  # today's routes, whatever this process's XLA flags
# Both routings: XLA's own convolutions (zoo's XLA:CPU flags) and jaxlib's default, where they
# are YNNPACK's (im2col kernel gradient, kept for wide layers: here on small ones).
ROUTINGS = {
    "xla-conv": CpuPolicy(ynn_convolutions=False, min_channels_for_im2col_gradient=1),
    "ynn-conv": CpuPolicy(ynn_convolutions=True, min_channels_for_im2col_gradient=1),
}


def under(policy, fn):
    """fn jitted with `policy` (None: XLA's native operations): a new function, a new trace."""
    return jax.jit(cpu.traced(lambda *a: fn(*a), policy))


def routed_by_ynn_convolutions(case) -> bool:
    """Whether `ynn_convolutions` changes the case's route: XLA's k x k convolutions (not a
    matmul, depthwise or Winograd route) take the im2col kernel gradient under it."""
    cin, cout, k, s, padding, groups, _ = case
    patch = k == s and padding == "VALID"
    winograd = k == 3 and s == 1 and min(cin, cout) >= 64
    return groups == 1 and k > 1 and not patch and not winograd


CASES_AND_ROUTINGS = [(*case, "xla-conv") for case in CASES] + [
    (*case, "ynn-conv") for case in CASES if routed_by_ynn_convolutions(case)
]


@pytest.mark.parametrize("cin, cout, k, s, padding, groups, size, routing", CASES_AND_ROUTINGS)
def test_conv_matches_flax(cin, cout, k, s, padding, groups, size, routing):
    policy = ROUTINGS[routing]
    use_bias = k != 3  # both settings over the cases, at half the compile time
    kw = dict(
        features=cout,
        kernel_size=(k, k),
        strides=(s, s),
        padding=padding,
        feature_group_count=groups,
        use_bias=use_bias,
        bias_init=nn.initializers.normal(1.0),
    )
    ours, theirs = conv.Conv(**kw), nn.Conv(**kw)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, cin))
    params = theirs.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(
        jnp.shape, params
    )
    weights = jax.random.normal(jax.random.PRNGKey(2), theirs.apply(params, x).shape)

    def loss(module, params, x):
        return jnp.sum(module.apply(params, x) * weights)

    y_ours, y_theirs = under(policy, ours.apply)(params, x), theirs.apply(params, x)
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    grads_ours = under(policy, jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1)))(params, x)
    grads_theirs = jax.grad(lambda p, x: loss(theirs, p, x), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(grads_ours), jax.tree.leaves(grads_theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_native_operations_and_bf16():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4)).astype(jnp.bfloat16)
    module = conv.Conv(4, (3, 3), feature_group_count=4, dtype=jnp.bfloat16)
    params = module.init(jax.random.PRNGKey(1), x)
    y = under(DEFAULT, module.apply)(params, x)
    assert y.dtype == jnp.bfloat16
    y_xla = under(None, module.apply)(params, x)  # None: XLA's native convolution
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(y_xla, np.float32), rtol=0.05, atol=0.05
    )


def gradients(loss, x, kernel, policy=DEFAULT):
    """d loss / d (x, kernel) under `policy`."""
    return under(policy, jax.grad(loss, argnums=(0, 1)))(x, kernel)


def conditionals(fn, *args, policy=DEFAULT) -> int:
    """The conditionals left in fn's program under `policy` after XLA:CPU's optimisations."""
    program = under(policy, fn).lower(*args).compile()
    return program.as_text().count(" conditional(")


def depthwise_then_norm(x, kernel):
    # ConvNeXt's pattern: a 7x7 depthwise convolution, then a reduction over channels
    y = cpu_conv.conv2d(x, kernel, (1, 1), ((3, 3), (3, 3)), groups=x.shape[-1])
    return jnp.sum((y - y.mean(-1, keepdims=True)) ** 2)


def test_depthwise_output_is_one_buffer_when_ynn_reduces():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 8))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (7, 7, 1, 8))
    grad_program = jax.grad(depthwise_then_norm, argnums=(0, 1))
    reducing = CpuPolicy(ynn_reductions=True)
    # kept by XLA; the gradient is plain
    assert conditionals(grad_program, x, kernel, policy=reducing) == 1
    with_buffer = gradients(depthwise_then_norm, x, kernel, reducing)
    # a NaN passes through (the conditional's predicate is False then)
    nan_x = x.at[0, 0, 0, 0].set(jnp.nan)
    assert np.isnan(np.asarray(under(reducing, depthwise_then_norm)(nan_x, kernel)))
    unbuffered = CpuPolicy(ynn_reductions=True, depthwise_output_buffer=False)
    assert conditionals(grad_program, x, kernel, policy=unbuffered) == 0
    plain = gradients(depthwise_then_norm, x, kernel, unbuffered)
    for a, b in zip(with_buffer, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    # no YNNPACK reductions to take the sum in: left to XLA
    assert conditionals(grad_program, x, kernel, policy=CpuPolicy(ynn_reductions=False)) == 0


def bottleneck_tail(x, kernel):
    # ResNet's pattern: a 1x1 convolution, then BatchNorm-like normalisation and a ReLU
    y = cpu_conv.conv2d(x, kernel)
    y = (y - y.mean((0, 1, 2))) / jnp.sqrt(y.var((0, 1, 2)) + 1e-5)
    return jnp.sum(jax.nn.relu(y) * jnp.arange(y.shape[-1]))


def norm_relu_conv(x, kernel):
    # ResNet's pattern: BatchNorm-like normalisation and a ReLU feeding a 3x3 convolution
    y = jax.nn.relu((x - x.mean((0, 1, 2))) / jnp.sqrt(x.var((0, 1, 2)) + 1e-5))
    y = cpu_conv.conv2d(y, kernel, (1, 1), ((1, 1), (1, 1)))
    return jnp.sum(y * jnp.arange(y.shape[-1]))


@pytest.mark.parametrize(
    "pattern, kernel_shape, field",
    [
        # a 1x1 convolution computes its output's gradient once
        (bottleneck_tail, (1, 1, 8, 16), "pointwise_gradient_buffer"),
        # XLA's own (3x3) convolution keeps its input for the backward pass
        (norm_relu_conv, (3, 3, 8, 4), "conv_input_buffer"),
    ],
)
def test_backward_buffers_change_the_program_not_the_gradients(pattern, kernel_shape, field):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 8))
    kernel = jax.random.normal(jax.random.PRNGKey(1), kernel_shape)
    grad_program = jax.grad(pattern, argnums=(0, 1))
    policy = CpuPolicy(matmul_kernel_gradient=False)  # its buffers: test_matmul_gradients
    assert conditionals(grad_program, x, kernel, policy=policy) == 1  # kept by XLA:CPU
    # the forward pass (inference) is untouched
    assert conditionals(pattern, x, kernel, policy=policy) == 0
    with_buffer = gradients(pattern, x, kernel, policy)
    without = dataclasses.replace(policy, **{field: False})
    assert conditionals(grad_program, x, kernel, policy=without) == 0
    plain = gradients(pattern, x, kernel, without)
    for a, b in zip(with_buffer, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("features_in, features_out", [(12, 5), (5, 12)])
def test_matmul_gradients_equal_jax(features_in, features_out):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, features_in))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (features_in, features_out))

    def loss(x, kernel):
        return jnp.sum(jnp.sin(cpu_matmul.matmul(x, kernel)) * jnp.arange(features_out))

    grad_program = jax.grad(loss, argnums=(0, 1))
    narrowing = features_out < features_in
    # narrowing: grad^T and the [O, I] product, each a buffer; widening: x^T
    assert conditionals(grad_program, x, kernel) == (2 if narrowing else 1)
    assert conditionals(loss, x, kernel) == 0  # the forward pass is untouched
    ours = gradients(loss, x, kernel)
    dense = nn.Dense(features_out, use_bias=False, dot_general=cpu_matmul.dense_dot_general)
    via_dense = jax.grad(lambda k: jnp.sum(jnp.sin(dense.apply({"params": {"kernel": k}}, x))))
    dense_grad = under(DEFAULT, via_dense)(kernel)
    off = CpuPolicy(matmul_kernel_gradient=False)
    assert conditionals(grad_program, x, kernel, policy=off) == 0
    for a, b in zip(ours, gradients(loss, x, kernel, off), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    plain = jax.grad(lambda k: jnp.sum(jnp.sin(x @ k)))(kernel)
    np.testing.assert_allclose(dense_grad, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 7, 64), (3, 4, 4, 64), (1, 1, 1, 64)])
def test_winograd_equals_xla_convolution_to_round_off(shape):
    """Output, input gradient and kernel gradient of the Winograd F(2x2, 3x3) route against
    XLA's convolution, odd and 1x1 spatial sizes included: relative 1e-6 measured (float32)."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 64, 48)) * 0.05
    grad = jax.random.normal(jax.random.PRNGKey(2), (*shape[:3], 48))
    y, vjp = jax.vjp(lambda x, k: winograd.winograd_with_vjp(x, k, DEFAULT), x, kernel)
    y_ref, vjp_ref = jax.vjp(
        lambda x, k: cpu_conv.xla_conv(x, k, (1, 1), ((1, 1), (1, 1))), x, kernel
    )
    for ours, ref in zip((y, *vjp(grad)), (y_ref, *vjp_ref(grad)), strict=True):
        assert ours.shape == ref.shape
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * scale)


def norm_winograd_norm(x, kernel):
    # ResNet's pattern around a Winograd convolution: BatchNorm-like normalisation and a ReLU
    # on either side, so that elementwise producers could be fused into its transforms
    def norm_relu(y):
        return jax.nn.relu((y - y.mean((0, 1, 2))) / jnp.sqrt(y.var((0, 1, 2)) + 1e-5))

    y = norm_relu(cpu_conv.conv2d(norm_relu(x), kernel, (1, 1), ((1, 1), (1, 1))))
    return jnp.sum(y * jnp.arange(y.shape[-1]))


@pytest.mark.parametrize("field", ["winograd_input_buffer", "winograd_gradient_buffer"])
def test_winograd_buffers_change_the_program_not_the_gradients(field):
    """The forward keeps its input, the backward its output gradient, as one buffer each (a
    conditional that XLA:CPU keeps); the gradients do not change."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 64))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 64, 64)) * 0.05
    grad_program = jax.grad(norm_winograd_norm, argnums=(0, 1))
    with_buffer = gradients(norm_winograd_norm, x, kernel)
    count = conditionals(grad_program, x, kernel)  # with the kernel gradient's 16 transposes
    without = CpuPolicy(**{field: False})
    assert conditionals(grad_program, x, kernel, policy=without) == count - 1
    plain = gradients(norm_winograd_norm, x, kernel, without)
    for a, b in zip(with_buffer, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_winograd_routes_3x3_stride_1_convolutions():
    """16 matmuls instead of a convolution in the forward program; the field and the channel
    threshold turn it off, and strided or narrow convolutions stay XLA's."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 64))

    def ops(kernel, strides=(1, 1), x=x, policy=DEFAULT):
        program = under(policy, lambda x, k: cpu_conv.conv2d(x, k, strides, ((1, 1), (1, 1))))
        text = program.lower(x, kernel).compile().as_text()
        return text.count(" dot("), text.count(" convolution(")

    kernel = jnp.ones((3, 3, 64, 64))
    assert ops(kernel) == (16, 0)
    assert ops(kernel, (2, 2)) == (0, 1)
    assert ops(kernel[:, :, :, :32]) == (0, 1)  # 32 output channels < min_channels_for_winograd
    assert ops(kernel[:, :, :, :32], policy=CpuPolicy(min_channels_for_winograd=32)) == (16, 0)
    half = jnp.bfloat16
    assert ops(kernel.astype(half), x=x.astype(half)) == (0, 1)  # float32 only: transforms round
    assert ops(kernel, policy=CpuPolicy(winograd=False)) == (0, 1)


DEPTHWISE_ALTERNATIVES = {
    "hand-written": CpuPolicy(),
    "jax's derivative": CpuPolicy(depthwise_vjp=False),
    "gradient read again": CpuPolicy(depthwise_gradient_from_spread=False),
    "all taps in one reduction": CpuPolicy(depthwise_taps_per_reduction=49),
    "one tap per reduction": CpuPolicy(depthwise_taps_per_reduction=1),
}


@pytest.mark.parametrize("alternative", DEPTHWISE_ALTERNATIVES)
@pytest.mark.parametrize("k, s, size", [(7, 1, 9), (3, 2, 10)])
def test_depthwise_fields_give_flaxs_gradients(alternative, k, s, size):
    # ConvNeXt's 7x7 and EfficientNet's strided 3x3 under each depthwise field's alternative
    kw = dict(features=8, kernel_size=(k, k), strides=(s, s), padding="SAME")
    ours, theirs = conv.Conv(feature_group_count=8, **kw), nn.Conv(feature_group_count=8, **kw)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 8))
    params = theirs.init(jax.random.PRNGKey(1), x)
    weights = jax.random.normal(jax.random.PRNGKey(2), theirs.apply(params, x).shape)

    def loss(module):
        return jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * weights), argnums=(0, 1))

    ours_grads = under(DEPTHWISE_ALTERNATIVES[alternative], loss(ours))(params, x)
    theirs_grads = loss(theirs)(params, x)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(theirs_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
