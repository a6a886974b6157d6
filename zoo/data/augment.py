"""Batch ops in JAX, run inside the jitted step and keyed by the step rng.

Array math that is the same for every image belongs on the device: uint8 batches cross to
the device (4x smaller than float32) and the ops fuse into the step.

  * normalize: uint8 -> float32 (x / 255 - mean) / std, for every view (`image`, `image_1`, ...).
  * photometric ops of SimCLR (Chen et al. 2020) and DINO (Caron et al. 2021), each per
    example with its own probability, on [0, 1] images before normalisation: colour jitter
    (brightness, contrast, saturation, hue in a random order, as torchvision's ColorJitter),
    random grayscale, Gaussian blur, solarize.
  * mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019) with timm's semantics: per batch,
    with probability `mix_prob`; cutmix instead of mixup with probability `switch_prob` when
    both are on; lam ~ Beta(alpha, alpha), the cutmix box's lam corrected to its clipped area;
    the batch is mixed with its reverse. The batch then carries `targets` [B, K] float32:
    the mixed label-smoothed one-hot labels (timm's `mixup_target`), and the method's loss uses
    them instead of `label`.

    augment = make_augment(mean, std, mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=1000,
                           label_smoothing=0.1)
    batch = augment(batch, rng, axis_name)    # inside train_step

Randomness per example (the photometric ops) is keyed by the example's index in the global
batch and randomness per batch (mixup's lam, the cutmix box) by the step rng alone, so jit,
pmap and one device augment each example the same way (zoo/parallel.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from zoo import parallel

Batch = dict[str, Any]
Augment = Callable[..., Batch]  # (batch, rng, axis_name=None) -> batch
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL and torchvision


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8 [B, H, W, C] in 0..255 (or float in [0, 1]) -> float32 (x - mean) / std."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    return (images - mean) / std


def image_keys(batch: Batch) -> list[str]:
    """The views of a batch: `image` and the extra views `image_1`, `image_2`, ..."""
    return [k for k in batch if k == "image" or k.startswith("image_")]


# ----------------------------------------------------------------------------- photometric
# Per-example functions of one image [H, W, C] in [0, 1]; vmapped over the batch.


def grayscale(image: jax.Array) -> jax.Array:
    """[H, W, 3] -> luma replicated on 3 channels (1-channel images are returned as they are)."""
    if image.shape[-1] == 1:
        return image
    gray = jnp.sum(image * jnp.asarray(_LUMA, image.dtype), axis=-1, keepdims=True)
    return jnp.broadcast_to(gray, image.shape)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(other + factor * (image - other), 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(image, jnp.mean(grayscale(image)[..., 0]), factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    return _blend(image, grayscale(image), factor)


def _rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    chroma = value - jnp.min(rgb, axis=-1)
    safe = jnp.where(chroma > 0, chroma, 1.0)
    hue = jnp.where(
        value == r,
        (g - b) / safe,
        jnp.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    hue = jnp.where(chroma > 0, (hue / 6.0) % 1.0, 0.0)
    saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
    return jnp.stack([hue, saturation, value], axis=-1)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    k = (jnp.asarray([5.0, 3.0, 1.0]) + hue[..., None] * 6.0) % 6.0
    return value[..., None] - value[..., None] * saturation[..., None] * jnp.clip(
        jnp.minimum(k, 4.0 - k), 0.0, 1.0
    )


def adjust_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotates the hue by `shift` turns (in [-0.5, 0.5])."""
    if image.shape[-1] == 1:
        return image
    hsv = _rgb_to_hsv(image)
    hsv = hsv.at[..., 0].set((hsv[..., 0] + shift) % 1.0)
    return jnp.clip(_hsv_to_rgb(hsv), 0.0, 1.0)


def color_jitter(image: jax.Array, rng: jax.Array, strength: float) -> jax.Array:
    """SimCLR's colour distortion at `strength` s: brightness, contrast and saturation factors
    uniform in [1 - 0.8s, 1 + 0.8s], hue shift in [-0.2s, 0.2s], applied in a random order."""
    order_rng, *factor_rngs = jax.random.split(rng, 5)
    spread = jnp.asarray([0.8, 0.8, 0.8, 0.2]) * strength
    low = jnp.asarray([1.0, 1.0, 1.0, 0.0]) - spread
    low = low.at[:3].set(jnp.maximum(low[:3], 0.0))
    high = jnp.asarray([1.0, 1.0, 1.0, 0.0]) + spread
    factors = jnp.stack(
        [
            jax.random.uniform(k, (), minval=low[i], maxval=high[i])
            for i, k in enumerate(factor_rngs)
        ]
    )
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    branches = [lambda x, f, op=op: op(x, f) for op in ops]
    order = jax.random.permutation(order_rng, 4)
    for i in range(4):
        image = jax.lax.switch(order[i], branches, image, factors[order[i]])
    return image


def gaussian_blur(image: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur with standard deviation `sigma` pixels, kernel 2 * radius + 1,
    edges reflected."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / jnp.sum(kernel)
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(image, pad, mode="reflect")
        size = image.shape[axis]
        image = sum(
            kernel[i] * jax.lax.slice_in_dim(padded, i, i + size, axis=axis)
            for i in range(2 * radius + 1)
        )
    return image


def solarize(image: jax.Array, threshold: float = 0.5) -> jax.Array:
    """Inverts the pixels at or above `threshold` (PIL's ImageOps.solarize, in [0, 1] units)."""
    return jnp.where(image >= threshold, 1.0 - image, image)


def photometric(
    images: jax.Array,
    rng: jax.Array,
    axis_name: str | None = None,
    *,
    color_jitter_strength: float = 0.0,
    color_jitter_prob: float = 0.8,
    grayscale_prob: float = 0.0,
    blur_prob: float = 0.0,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    solarize_prob: float = 0.0,
) -> jax.Array:
    """The SimCLR/DINO ops on float [B, H, W, C] in [0, 1], each per example with its
    probability, in SimCLR's order: jitter, grayscale, blur, solarize. Example i draws from
    `fold_in(rng, i)`, i its index in the global batch (`axis_name`: zoo/parallel.py)."""
    radius = max(1, min(int(3 * blur_sigma[1] + 0.5), (min(images.shape[1:3]) - 1) // 2))

    def one(image, rng):
        keys = jax.random.split(rng, 8)

        def maybe(key, prob, fn, x):
            return jnp.where(jax.random.uniform(key) < prob, fn(x), x) if prob > 0 else x

        if color_jitter_strength > 0:
            image = maybe(
                keys[0],
                color_jitter_prob,
                lambda x: color_jitter(x, keys[1], color_jitter_strength),
                image,
            )
        image = maybe(keys[2], grayscale_prob, grayscale, image)
        sigma = jax.random.uniform(keys[3], (), minval=blur_sigma[0], maxval=blur_sigma[1])
        image = maybe(keys[4], blur_prob, lambda x: gaussian_blur(x, sigma, radius), image)
        return maybe(keys[5], solarize_prob, solarize, image)

    return jax.vmap(one)(images, parallel.example_keys(rng, images.shape[0], axis_name))


# ----------------------------------------------------------------------------- mixup/cutmix


def mix_targets(
    labels: jax.Array,
    num_classes: int,
    lam: jax.Array,
    smoothing: float,
    axis_name: str | None = None,
):
    """timm's mixup_target: lam * smooth(y) + (1 - lam) * smooth(reversed y), [B, K]."""
    off = smoothing / num_classes
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    smooth = one_hot * (1.0 - smoothing) + off
    return lam * smooth + (1.0 - lam) * parallel.reverse(smooth, axis_name)


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array):
    """A box of area ~ (1 - lam) H W centred uniformly, clipped to the image (timm's
    rand_bbox) -> (top, bottom, left, right) and the lam corrected to the clipped area."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
    cy_rng, cx_rng = jax.random.split(rng)
    cy = jax.random.randint(cy_rng, (), 0, height)
    cx = jax.random.randint(cx_rng, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    corrected = 1.0 - (bottom - top) * (right - left) / (height * width)
    return (top, bottom, left, right), corrected


def mixup_cutmix(
    images: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mix_prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mixes a float batch [B, H, W, C] with its reverse -> (images, targets [B, K]). The
    reverse is the global batch's (`zoo.parallel.reverse`); lam and the box are per batch."""
    apply_rng, switch_rng, lam_rng, box_rng = jax.random.split(rng, 4)
    use_cutmix = jnp.asarray(mixup_alpha <= 0 and cutmix_alpha > 0)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(switch_rng) < switch_prob
    alpha = jnp.where(use_cutmix, max(cutmix_alpha, 1e-3), max(mixup_alpha, 1e-3))
    lam = jax.random.beta(lam_rng, alpha, alpha)
    lam = jnp.where(jax.random.uniform(apply_rng) < mix_prob, lam, 1.0)

    height, width = images.shape[1:3]
    (top, bottom, left, right), box_lam = cutmix_box(box_rng, height, width, lam)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # [H, W]
    partner = parallel.reverse(images, axis_name)
    cut = jnp.where(inside[None, :, :, None], partner, images)
    mixed = lam * images + (1.0 - lam) * partner
    images = jnp.where(use_cutmix, cut, mixed)
    lam = jnp.where(use_cutmix, box_lam, lam)
    return images, mix_targets(labels, num_classes, lam, label_smoothing, axis_name)


def make_augment(
    mean: Sequence[float],
    std: Sequence[float],
    *,
    num_classes: int = 0,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mix_prob: float = 1.0,
    mix_switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
    color_jitter: float = 0.0,
    color_jitter_prob: float = 0.8,
    grayscale_prob: float = 0.0,
    blur_prob: float = 0.0,
    solarize_prob: float = 0.0,
    per_view: dict[str, dict[str, float]] | None = None,
) -> Augment:
    """The device-side batch transform of a run: `augment(batch, rng, axis_name) -> batch`.

    With every option at its default it only normalises (the eval transform). Mixing needs
    `num_classes` and integer labels (multiclass); it adds `targets` [B, K] to the batch.
    The photometric options apply to every view, except those whose key (`image`, `image_1`,
    ...) `per_view` maps to their own `photometric` keyword arguments (a method's views:
    BYOL's and DINO's views differ in blur and solarize).
    """
    mean, std = tuple(mean), tuple(std)
    mixing = mixup_alpha > 0 or cutmix_alpha > 0
    if mixing and num_classes <= 0:
        raise ValueError("mixup/cutmix need num_classes > 0 to build the mixed targets")
    colour = dict(
        color_jitter_strength=color_jitter,
        color_jitter_prob=color_jitter_prob,
        grayscale_prob=grayscale_prob,
        blur_prob=blur_prob,
        solarize_prob=solarize_prob,
    )

    def photometric_on(settings: dict[str, float]) -> bool:
        keys = ("color_jitter_strength", "grayscale_prob", "blur_prob", "solarize_prob")
        return any(settings.get(k, 0.0) > 0 for k in keys)

    def augment(batch: Batch, rng: jax.Array, axis_name: str | None = None) -> Batch:
        batch = dict(batch)
        colour_rng, mix_rng = jax.random.split(rng)
        for i, key in enumerate(image_keys(batch)):
            images = batch[key]
            settings = colour if per_view is None else per_view.get(key, colour)
            if photometric_on(settings):
                images = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images
                view_rng = jax.random.fold_in(colour_rng, i)
                images = photometric(images, view_rng, axis_name, **settings)
            batch[key] = normalize(images, mean, std)
        if mixing:
            batch["image"], batch["targets"] = mixup_cutmix(
                batch["image"],
                batch["label"],
                mix_rng,
                num_classes=num_classes,
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                mix_prob=mix_prob,
                switch_prob=mix_switch_prob,
                label_smoothing=label_smoothing,
                axis_name=axis_name,
            )
        return batch

    return augment


def photometric_from_config(data_config: Any) -> dict[str, float]:
    """The `data` namespace's photometric ops as `photometric`'s keyword arguments."""
    c = data_config
    return dict(
        color_jitter_strength=c.color_jitter,
        color_jitter_prob=c.color_jitter_prob,
        grayscale_prob=c.grayscale_prob,
        blur_prob=c.blur_prob,
        solarize_prob=c.solarize_prob,
    )


def augment_from_config(
    data_config: Any, spec: Any, label_smoothing: float = 0.0, views: Sequence[Any] | None = None
) -> Augment:
    """The train-time `augment` of a run from the config's `data` namespace and its dataset.

    `views` (a method's `View`s) give each view its photometric ops; without them every view
    gets the `data` namespace's. Mixup/cutmix (supervised multiclass) come from `data`.
    """
    c = data_config
    per_view = None if views is None else {view.key: dict(view.photometric) for view in views}
    return make_augment(
        spec.mean,
        spec.std,
        num_classes=spec.num_classes,
        mixup_alpha=c.mixup_alpha,
        cutmix_alpha=c.cutmix_alpha,
        mix_prob=c.mix_prob,
        mix_switch_prob=c.mix_switch_prob,
        label_smoothing=label_smoothing,
        color_jitter=c.color_jitter,
        color_jitter_prob=c.color_jitter_prob,
        grayscale_prob=c.grayscale_prob,
        blur_prob=c.blur_prob,
        solarize_prob=c.solarize_prob,
        per_view=per_view,
    )
