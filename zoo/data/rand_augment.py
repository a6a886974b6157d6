"""RandAugment (Cubuk et al. 2020, https://arxiv.org/abs/1909.13719) on uint8 host images.

timm's variant "rand-m{magnitude}-mstd{magnitude_std}-inc1": each image gets `num_ops` ops
drawn uniformly (with replacement) from the "increasing" set below, each applied with
probability `prob`; magnitude m in [0, 10] (10 = strongest), jittered per op by
N(0, magnitude_std) and clipped. Geometric ops fill with timm's grey (124, 116, 104) and pick
the sign of their angle/shift at random. Written with PIL and numpy; seeded by grain's
per-example generator.

    op = rand_augment_op(num_ops=2, magnitude=9)          # config: "rand_augment(magnitude=9)"
    example = op({"image": uint8 [H, W, C], ...}, rng)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (124, 116, 104)  # timm's _FILL: the ImageNet mean in 0..255


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    fill = FILL if image.mode == "RGB" else FILL[0]
    return image.transform(image.size, Image.AFFINE, matrix, Image.BILINEAR, fillcolor=fill)


def _rotate(image, m, rng):
    fill = FILL if image.mode == "RGB" else FILL[0]
    return image.rotate(_signed(30.0 * m, rng), Image.BILINEAR, fillcolor=fill)


def _shear_x(image, m, rng):
    return _affine(image, (1, _signed(0.3 * m, rng), 0, 0, 1, 0))


def _shear_y(image, m, rng):
    return _affine(image, (1, 0, 0, _signed(0.3 * m, rng), 1, 0))


def _translate_x(image, m, rng):
    return _affine(image, (1, 0, _signed(0.45 * m, rng) * image.size[0], 0, 1, 0))


def _translate_y(image, m, rng):
    return _affine(image, (1, 0, 0, 0, 1, _signed(0.45 * m, rng) * image.size[1]))


def _enhance(enhancer) -> Callable[..., Image.Image]:
    def op(image, m, rng):
        return enhancer(image).enhance(1.0 + _signed(0.9 * m, rng))

    return op


def _posterize(image, m, rng):
    return ImageOps.posterize(image, max(1, 4 - int(4 * m)))


def _solarize(image, m, rng):
    return ImageOps.solarize(image, 256 - int(256 * m))


def _solarize_add(image, m, rng):
    array = np.asarray(image).astype(np.int32)
    added = np.where(array < 128, np.minimum(array + int(110 * m), 255), array)
    return Image.fromarray(added.astype(np.uint8), image.mode)


# name -> fn(image, magnitude in [0, 1], rng); timm's _RAND_INCREASING_TRANSFORMS.
OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "AutoContrast": lambda image, m, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, m, rng: ImageOps.equalize(image),
    "Invert": lambda image, m, rng: ImageOps.invert(image),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}
_NAMES = tuple(OPS)


def apply_op(image: np.ndarray, name: str, magnitude: float, rng: np.random.Generator):
    """One RandAugment op at `magnitude` in [0, 10] on uint8 [H, W, C] -> uint8 [H, W, C]."""
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(OPS[name](pil, float(np.clip(magnitude, 0, MAX_LEVEL)) / MAX_LEVEL, rng))
    return out[..., None] if squeeze else out


def rand_augment_op(
    num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5
) -> Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]:
    """The per-example RandAugment op for grain's random_map (see module docstring)."""
    if not 0 <= magnitude <= MAX_LEVEL:
        raise ValueError(f"rand_augment magnitude must be in [0, {MAX_LEVEL:g}], got {magnitude}")

    def op(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = example["image"]
        for index in rng.integers(0, len(_NAMES), num_ops):
            if rng.random() >= prob:
                continue
            m = magnitude + rng.normal(0.0, magnitude_std) if magnitude_std > 0 else magnitude
            image = apply_op(image, _NAMES[index], m, rng)
        return {**example, "image": image}

    return op
