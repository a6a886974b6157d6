"""Per-image host ops for grain, and the little language that names them in configs.

A per-image pipeline is written in the config as ops joined by "|":

    data.train_ops = "random_crop(padding=4)|flip"

Each op is registered in TRANSFORMS as a factory `op(**kwargs) -> fn(example, rng)`, where
`rng` is grain's per-example `np.random.Generator` (seeded from the data seed and the example
index, so the same seed gives the same augmented batches). Array math that is the same for
every image (normalisation, mixup, colour ops) runs on the device: see zoo/data/augment.py.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import numpy as np

from zoo.registry import Registry

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

TRANSFORMS: Registry[Callable[..., Op]] = Registry("transform")


@TRANSFORMS.register
def random_crop(padding: int = 4, size: int | None = None) -> Op:
    """Zero-pads by `padding` pixels on each side, then crops `size` (default: the input's)
    at a random position — the CIFAR augmentation of He et al. 2016."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]  # [H, W, C]
        height, width = image.shape[:2]
        crop_h, crop_w = (size, size) if size else (height, width)
        padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
        top = rng.integers(0, height + 2 * padding - crop_h + 1)
        left = rng.integers(0, width + 2 * padding - crop_w + 1)
        return {**example, "image": padded[top : top + crop_h, left : left + crop_w]}

    return op


@TRANSFORMS.register
def flip(prob: float = 0.5) -> Op:
    """Horizontal flip with probability `prob`."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        if rng.random() < prob:
            return {**example, "image": example["image"][:, ::-1]}
        return example

    return op


def _resize(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    from PIL import Image

    methods = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    if interpolation not in methods:
        raise ValueError(f"interpolation must be one of {', '.join(methods)}")
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((width, height), methods[interpolation]))
    return out[..., None] if squeeze else out


@TRANSFORMS.register
def random_resized_crop(
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
) -> Op:
    """Inception crop (Szegedy et al. 2015): a random area fraction in `scale` and aspect
    ratio in `ratio` (log-uniform), resized to size x size; falls back to a centre crop."""
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))

    def op(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        height, width = image.shape[:2]
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = np.exp(rng.uniform(*log_ratio))
            w = int(round(np.sqrt(target * aspect)))
            h = int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = rng.integers(0, height - h + 1)
                left = rng.integers(0, width - w + 1)
                break
        else:  # centre crop at the nearest allowed aspect ratio
            aspect = width / height
            if aspect < ratio[0]:
                w, h = width, int(round(width / ratio[0]))
            elif aspect > ratio[1]:
                w, h = int(round(height * ratio[1])), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        crop = image[top : top + h, left : left + w]
        return {**example, "image": _resize(crop, size, size, interpolation)}

    return op


@TRANSFORMS.register
def resize_center_crop(size: int, crop_pct: float = 0.875, interpolation: str = "bilinear") -> Op:
    """Eval preprocessing (timm's): resize the short side to size / crop_pct, then take the
    central size x size crop."""

    def op(example: Example, rng: np.random.Generator | None = None) -> Example:
        image = example["image"]
        height, width = image.shape[:2]
        short = int(np.floor(size / crop_pct))
        if height <= width:
            new_h, new_w = short, int(round(width * short / height))
        else:
            new_h, new_w = int(round(height * short / width)), short
        image = _resize(image, new_h, new_w, interpolation)
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        return {**example, "image": image[top : top + size, left : left + size]}

    return op


def parse_ops(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """ "random_crop(padding=4)|flip" -> [("random_crop", {"padding": 4}), ("flip", {})]."""
    ops = []
    for text in filter(None, (part.strip() for part in spec.split("|"))):
        try:
            node = ast.parse(text, mode="eval").body
            if isinstance(node, ast.Name):
                ops.append((node.id, {}))
                continue
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                raise ValueError
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (SyntaxError, ValueError):
            raise ValueError(
                f"cannot parse transform '{text}' in '{spec}': write ops as "
                "name or name(key=value, ...) joined by '|', e.g. 'random_crop(padding=4)|flip'"
            ) from None
        ops.append((node.func.id, kwargs))
    return ops


def build_ops(spec: str) -> list[Op]:
    """The ops named in `spec`, validated: unknown names and arguments are errors."""
    built = []
    for name, kwargs in parse_ops(spec):
        factory = TRANSFORMS.get(name)
        try:
            built.append(factory(**kwargs))
        except TypeError as e:
            raise ValueError(f"transform '{name}': {e}") from None
    return built


def compose(ops: list[Op]) -> Op:
    def apply(example: Example, rng: np.random.Generator) -> Example:
        for op in ops:
            example = op(example, rng)
        return example

    return apply
