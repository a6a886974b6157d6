"""Device batch ops (zoo/data/augment.py): shapes, ranges and the property each must keep."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.data import augment

B, H, W = 8, 16, 20


def images(seed=0, channels=3):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.random((B, H, W, channels), dtype=np.float32))


LABELS = jnp.arange(B, dtype=jnp.int32) % 5  # labels[i] != labels[B - 1 - i] for B=8, K=5


def test_normalize_uint8_and_every_view():
    fn = augment.make_augment((0.5,) * 3, (0.25,) * 3)
    batch = {"image": jnp.full((2, 4, 4, 3), 255, jnp.uint8), "image_1": jnp.zeros((2, 2, 2, 3))}
    batch["image_1"] = batch["image_1"].astype(jnp.uint8)
    out = fn({**batch, "label": jnp.zeros(2, jnp.int32)}, jax.random.PRNGKey(0))
    np.testing.assert_allclose(out["image"], 2.0)
    np.testing.assert_allclose(out["image_1"], -2.0)
    assert out["image"].dtype == jnp.float32 and "targets" not in out


def test_mixup_targets_sum_to_one_and_match_the_numpy_formula():
    x, smoothing, k = images(), 0.1, 5
    mix = jax.jit(
        lambda x, rng: augment.mixup_cutmix(
            x, LABELS, rng, num_classes=k, mixup_alpha=0.8, label_smoothing=0.1
        )
    )
    mixed, targets = mix(x, jax.random.PRNGKey(3))
    targets, mixed = np.asarray(targets), np.asarray(mixed)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    off = smoothing / k
    lam = (targets[0, int(LABELS[0])] - off) / (1 - smoothing)
    assert 0.0 <= lam <= 1.0
    xn, labels = np.asarray(x), np.asarray(LABELS)
    np.testing.assert_allclose(mixed, lam * xn + (1 - lam) * xn[::-1], atol=1e-5)
    smooth = np.eye(k)[labels] * (1 - smoothing) + off
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-6)


def test_cutmix_pastes_a_box_and_targets_follow_its_area():
    x = images()
    mix = jax.jit(
        lambda x, rng: augment.mixup_cutmix(x, LABELS, rng, num_classes=5, cutmix_alpha=1.0)
    )
    for seed in range(5):
        mixed, targets = mix(x, jax.random.PRNGKey(seed))
        mixed, xn = np.asarray(mixed), np.asarray(x)
        from_other = np.all(np.isclose(mixed, xn[::-1]), axis=-1) & ~np.all(
            np.isclose(mixed, xn), axis=-1
        )
        assert np.all(np.isclose(mixed, xn) | np.isclose(mixed, xn[::-1]))
        lam = float(targets[0, int(LABELS[0])])
        np.testing.assert_allclose(from_other[0].mean(), 1 - lam, atol=1e-6)
        np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)


def test_mix_prob_zero_leaves_images_and_gives_smoothed_one_hot():
    x = images()
    mixed, targets = augment.mixup_cutmix(
        x, LABELS, jax.random.PRNGKey(0), num_classes=5, mixup_alpha=1.0, cutmix_alpha=1.0,
        mix_prob=0.0, label_smoothing=0.2,
    )  # fmt: skip
    np.testing.assert_allclose(mixed, x, atol=1e-6)
    np.testing.assert_allclose(targets, np.eye(5)[np.asarray(LABELS)] * 0.8 + 0.04, atol=1e-6)


def test_grayscale_has_equal_channels_and_keeps_luma():
    out = np.asarray(augment.grayscale(images()[0]))
    np.testing.assert_allclose(out[..., 0], out[..., 1])
    np.testing.assert_allclose(out[..., 1], out[..., 2])


def test_solarize_inverts_only_above_the_threshold():
    x = images()
    out = np.asarray(augment.solarize(x, 0.5))
    xn = np.asarray(x)
    np.testing.assert_allclose(out[xn < 0.5], xn[xn < 0.5])
    np.testing.assert_allclose(out[xn >= 0.5], 1 - xn[xn >= 0.5])


def test_color_jitter_with_zero_strength_is_identity_and_hue_matches_colorsys():
    x = images()[0]
    np.testing.assert_allclose(augment.color_jitter(x, jax.random.PRNGKey(1), 0.0), x, atol=1e-5)
    pixel = np.asarray(x[0, 0])
    h, s, v = colorsys.rgb_to_hsv(*pixel)
    want = colorsys.hsv_to_rgb((h + 0.25) % 1.0, s, v)
    np.testing.assert_allclose(augment.adjust_hue(x, 0.25)[0, 0], want, atol=1e-5)
    np.testing.assert_allclose(augment.adjust_saturation(x, 0.0), augment.grayscale(x), atol=1e-6)


def test_gaussian_blur_keeps_constants_and_smooths():
    constant = jnp.full((H, W, 3), 0.3)
    np.testing.assert_allclose(augment.gaussian_blur(constant, 1.5, 4), constant, atol=1e-6)
    x = images()[0]
    blurred = augment.gaussian_blur(x, 1.5, 4)
    assert float(jnp.std(blurred)) < 0.5 * float(jnp.std(x))
    np.testing.assert_allclose(augment.gaussian_blur(x, 0.01, 4), x, atol=1e-5)


@pytest.mark.parametrize("channels", [3, 1])
def test_photometric_ops_keep_shape_dtype_and_range(channels):
    x = images(channels=channels)
    ops = jax.jit(
        lambda x, rng: augment.photometric(
            x, rng, color_jitter_strength=1.0, color_jitter_prob=1.0, grayscale_prob=0.5,
            blur_prob=0.5, solarize_prob=0.5,
        )
    )  # fmt: skip
    out = ops(x, jax.random.PRNGKey(0))
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not np.allclose(out, x)
    # Per example: with probability 1 grayscale every image has equal channels.
    if channels == 3:
        gray = jax.jit(lambda x: augment.photometric(x, jax.random.PRNGKey(0), grayscale_prob=1))(x)
        np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-6)


def test_full_train_augment_is_jittable_and_deterministic():
    fn = jax.jit(
        augment.make_augment(
            (0.5,) * 3, (0.5,) * 3, num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0,
            label_smoothing=0.1, color_jitter=0.5, grayscale_prob=0.2, blur_prob=0.5,
            solarize_prob=0.2,
        )
    )  # fmt: skip
    batch = {
        "image": (images() * 255).astype(jnp.uint8),
        "image_1": (images(1) * 255).astype(jnp.uint8),
        "label": LABELS,
    }
    a, b = fn(batch, jax.random.PRNGKey(0)), fn(batch, jax.random.PRNGKey(0))
    c = fn(batch, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.allclose(a["image"], c["image"])
    assert a["targets"].shape == (B, 5) and a["image_1"].shape == (B, H, W, 3)
    np.testing.assert_allclose(a["targets"].sum(-1), 1.0, rtol=1e-6)


def test_supervised_loss_uses_soft_targets_when_present():
    import flax.linen as nn

    from zoo.methods.supervised import supervised

    class Linear(nn.Module):  # the loss is what is tested: a tiny model keeps it fast
        @nn.compact
        def __call__(self, x, *, train):
            return nn.Dense(5)(x.reshape(x.shape[0], -1))

    model = Linear()
    method = supervised(model, 5)
    batch = {"image": images(), "label": LABELS}
    params, state, extra = method.init(jax.random.PRNGKey(0), batch)
    rng = jax.random.PRNGKey(1)
    plain, _ = method.loss(params, state, extra, batch, rng, train=False)
    one_hot = {**batch, "targets": jax.nn.one_hot(LABELS, 5)}
    same, _ = method.loss(params, state, extra, one_hot, rng, train=False)
    uniform = {**batch, "targets": jnp.full((B, 5), 0.2)}
    other, (metrics, _, _) = method.loss(params, state, extra, uniform, rng, train=False)
    np.testing.assert_allclose(plain, same, rtol=1e-6)
    assert not np.isclose(plain, other) and 0.0 <= float(metrics["accuracy"]) <= 1.0
