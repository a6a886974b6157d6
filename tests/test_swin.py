"""Swin specifics beyond the generic registry tests: windows at other resolutions, the shift
mask, bfloat16 compute. A 2-stage, 32-wide config keeps these cheap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo import cpu
from zoo.models.swin import shift_mask, window_partition, window_reverse

NAME = "swin_tiny_patch4_window7_224"
SMALL = dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2))


def test_window_partition_round_trip_and_shift_mask():
    x = np.arange(2 * 14 * 21 * 3, dtype=np.float32).reshape(2, 14, 21, 3)
    windows = window_partition(x, (7, 7))
    assert windows.shape == (2 * 2 * 3, 49, 3)
    np.testing.assert_array_equal(window_reverse(windows, (7, 7), 14, 21), x)
    mask = shift_mask(14, 14, (7, 7), (3, 3))
    assert mask.shape == (4, 49, 49)
    assert not mask[0].any()  # the top-left window holds no wrapped-around tokens
    assert (mask[3] == -100).any() and (np.diag(mask[3]) == 0).all()


def test_windows_follow_img_size_like_timm():
    assert zoo.create_model(NAME).stage_windows() == [(7, 3), (7, 3), (7, 3), (7, 0)]
    assert zoo.create_model(NAME, img_size=64).stage_windows() == [(7, 3), (7, 3), (4, 0), (2, 0)]


def test_nano_variant_windows_divide_its_32_px_stages():
    # 16 -> 8 -> 4 token grids: shifted 4x4 windows, then the whole 4x4 map unshifted.
    model = zoo.create_model("swin_nano_patch2_window4_32")
    assert model.stage_windows() == [(4, 2), (4, 2), (4, 0)]


@pytest.fixture(scope="module")
def small():
    """A 2-stage Swin-T-shaped model, initialised once (jit: one compile, not one per op)."""
    model = zoo.create_model(NAME, num_classes=3, drop_path_rate=0.5, **SMALL)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    variables = jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(0), x, train=False)
    apply = jax.jit(model.apply, static_argnames="train")
    return model, variables, x, apply, apply(variables, x, train=False)


def test_train_and_eval_with_stochastic_depth(small):
    model, variables, x, apply, logits = small
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    outs = [
        apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(i)}) for i in (1, 2)
    ]
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)
    assert not np.allclose(outs[0], outs[1])  # blocks dropped at random


def test_img_size_clamps_windows_and_keeps_parameter_shapes(small):
    """Other input sizes with timm's windows are covered by test_pretrained's parity at 96 px;
    here `img_size=32` shrinks the windows and still loads the same parameters."""
    model, variables, x, _, _ = small
    clamped = model.clone(img_size=32)
    assert clamped.stage_windows() == [(7, 3), (4, 0)]
    shapes = jax.eval_shape(lambda: clamped.init(jax.random.PRNGKey(0), x, train=False))
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(jnp.shape, variables)
    logits = jax.jit(clamped.apply, static_argnames="train")(variables, x, train=False)
    assert logits.shape == (2, 3) and bool(jnp.all(jnp.isfinite(logits)))


def test_bfloat16_compute_stays_close_to_float32(small):
    model, variables, x, _, full = small
    half = jax.jit(model.clone(dtype=jnp.bfloat16).apply, static_argnames="train")(
        variables, x, train=False
    )
    assert half.dtype == jnp.float32
    # bfloat16 keeps 8 mantissa bits (~0.4% relative): allow 3% of the logit range.
    assert float(jnp.max(jnp.abs(half - full))) <= 0.03 * float(jnp.max(jnp.abs(full)))


def test_window_buffers_change_the_program_not_the_gradients(small):
    model, variables, x, _, _ = small

    rngs = {"dropout": jax.random.PRNGKey(3)}

    def loss(params):
        logits = model.apply({"params": params}, x, train=True, rngs=rngs)
        return jnp.sum(logits**2)

    def traced(buffers: bool):
        policy = cpu.CpuPolicy(window_buffers=buffers)
        program = jax.jit(cpu.traced(jax.grad(loss), policy)).lower(variables["params"]).compile()
        return program, program(variables["params"])

    plain, plain_grads = traced(False)
    buffered, buffered_grads = traced(True)

    def count(program) -> int:
        return program.as_text().count(" conditional(")

    # per block a forward buffer of the windows and one of their gradient, and the gradient
    # at the patch merging's input: more conditionals, the same numbers
    assert count(buffered) > count(plain)
    for a, b in zip(jax.tree.leaves(buffered_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
