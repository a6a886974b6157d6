"""Per-image host ops for grain, and the little language that names them in configs.

A per-image pipeline is written in the config as ops joined by "|":

    data.train_ops = "random_crop(padding=4)|flip"                       # CIFAR
    data.train_ops = "random_resized_crop(size=224)|flip|rand_augment(num_ops=2, magnitude=9)"
    data.eval_ops = "resize_center_crop(size=224, crop_pct=0.875)"       # or eval_ops_for_model
    data.train_ops = "multi_crop(global_size=224, local_size=96, num_local=6)"  # DINO views

Ops (names as in timm/big_vision): decode, random_crop, flip, resize, center_crop,
resize_center_crop, random_resized_crop, rand_augment (zoo/data/rand_augment.py),
random_erasing, multi_crop.

Each op is registered in TRANSFORMS as a factory `op(**kwargs) -> fn(example, rng)`, where
`rng` is grain's per-example `np.random.Generator` (seeded from the data seed and the example
index, so the same seed gives the same augmented batches). Array math that is the same for
every image (normalisation, mixup, colour ops) runs on the device: see zoo/data/augment.py.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import numpy as np

from zoo.registry import Registry

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

TRANSFORMS: Registry[Callable[..., Op]] = Registry("transform")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "area")


def _require(ok: bool, message: str) -> None:
    """An op's argument check, at build time (before any image is read)."""
    if not ok:
        raise ValueError(message)


def _positive_size(size: Any, name: str = "size") -> None:
    sides = size if isinstance(size, tuple | list) else (size,)
    _require(all(side > 0 for side in sides), f"{name} must be > 0, got {size}")


def _probability(prob: float, name: str = "prob") -> None:
    _require(0.0 <= prob <= 1.0, f"{name} must be in [0, 1], got {prob}")


def _interpolation(interpolation: str) -> None:
    _require(
        interpolation in INTERPOLATIONS,
        f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got '{interpolation}'",
    )


@TRANSFORMS.register
def random_crop(padding: int = 4, size: int | None = None) -> Op:
    """Zero-pads by `padding` pixels on each side, then crops `size` (default: the input's)
    at a random position — the CIFAR augmentation of He et al. 2016."""
    _require(padding >= 0, f"padding must be >= 0, got {padding}")
    if size is not None:
        _positive_size(size)

    def op(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]  # [H, W, C]
        height, width = image.shape[:2]
        crop_h, crop_w = (size, size) if size else (height, width)
        top = rng.integers(0, height + 2 * padding - crop_h + 1)
        left = rng.integers(0, width + 2 * padding - crop_w + 1)
        # The crop of the zero-padded image, without building it: np.pad took ~85% of this
        # op's time on 28x28 images. (top, left) in the unpadded image's coordinates:
        top, left = int(top) - padding, int(left) - padding
        crop = np.zeros((crop_h, crop_w, *image.shape[2:]), image.dtype)
        y0, y1 = max(top, 0), min(top + crop_h, height)  # the image rows inside the crop
        x0, x1 = max(left, 0), min(left + crop_w, width)
        if y0 < y1 and x0 < x1:
            crop[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
        return {**example, "image": crop}

    return op


@TRANSFORMS.register
def flip(prob: float = 0.5) -> Op:
    """Horizontal flip with probability `prob`."""
    _probability(prob)

    def op(example: Example, rng: np.random.Generator) -> Example:
        if rng.random() < prob:
            return {**example, "image": example["image"][:, ::-1]}
        return example

    return op


def _resize(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    from PIL import Image

    methods = {
        "bilinear": Image.BILINEAR,
        "bicubic": Image.BICUBIC,
        "nearest": Image.NEAREST,
        "lanczos": Image.LANCZOS,
        "area": Image.BOX,
    }
    _interpolation(interpolation)
    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((width, height), methods[interpolation]))
    return out[..., None] if squeeze else out


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """The Inception crop box (top, left, h, w): area fraction uniform in `scale`, aspect
    ratio log-uniform in `ratio`; after 10 misses, a centre crop at the nearest allowed
    aspect ratio (timm's/torchvision's RandomResizedCrop.get_params)."""
    area = height * width
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_ratio))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@TRANSFORMS.register
def random_resized_crop(
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
) -> Op:
    """Inception crop (Szegedy et al. 2015): a random area fraction in `scale` and aspect
    ratio in `ratio` (log-uniform), resized to size x size; falls back to a centre crop."""
    _positive_size(size)
    _require(0 < scale[0] <= scale[1], f"scale must be (min, max) with 0 < min <= max, got {scale}")
    _require(0 < ratio[0] <= ratio[1], f"ratio must be (min, max) with 0 < min <= max, got {ratio}")
    _interpolation(interpolation)

    def op(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        top, left, h, w = sample_crop_box(*image.shape[:2], scale, ratio, rng)
        crop = image[top : top + h, left : left + w]
        return {**example, "image": _resize(crop, size, size, interpolation)}

    return op


@TRANSFORMS.register
def resize(size: int | tuple[int, int], interpolation: str = "bilinear") -> Op:
    """Resizes the short side to `size` (aspect kept), or to exactly (height, width)."""
    _positive_size(size)
    _interpolation(interpolation)

    def op(example: Example, rng: np.random.Generator | None = None) -> Example:
        image = example["image"]
        height, width = image.shape[:2]
        if isinstance(size, int):
            scale = size / min(height, width)
            new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        else:
            new_h, new_w = size
        return {**example, "image": _resize(image, new_h, new_w, interpolation)}

    return op


@TRANSFORMS.register
def center_crop(size: int | tuple[int, int]) -> Op:
    """The central size x size (or (height, width)) crop; zero-padded if the image is smaller."""
    _positive_size(size)
    crop_h, crop_w = (size, size) if isinstance(size, int) else size

    def op(example: Example, rng: np.random.Generator | None = None) -> Example:
        image = example["image"]
        pad_h, pad_w = max(crop_h - image.shape[0], 0), max(crop_w - image.shape[1], 0)
        if pad_h or pad_w:
            image = np.pad(
                image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
            )
        top = int(round((image.shape[0] - crop_h) / 2))
        left = int(round((image.shape[1] - crop_w) / 2))
        return {**example, "image": image[top : top + crop_h, left : left + crop_w]}

    return op


@TRANSFORMS.register
def resize_center_crop(
    size: int | tuple[int, int], crop_pct: float = 0.875, interpolation: str = "bilinear"
) -> Op:
    """Eval preprocessing, pixel for pixel timm's ("center" crop mode): resize, then take the
    central `size` crop. The one implementation of it: training's `data.eval_ops` and
    `zoo.inference` both use it.

    A square `size` (an int, or (s, s)) resizes the short side to floor(s / crop_pct) and the
    long side to int(long * short_new / short), keeping the aspect ratio (torchvision's
    `Resize(int)`); a non-square (height, width) resizes to exactly
    (floor(height / crop_pct), floor(width / crop_pct)), as timm does. The crop offsets
    round half to even (torchvision's `CenterCrop`); a crop larger than the image is
    zero-padded (crop_pct > 1).
    """
    _positive_size(size)
    _require(crop_pct > 0, f"crop_pct must be > 0 (timm: 0.875), got {crop_pct}")
    _interpolation(interpolation)
    crop_h, crop_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    crop = center_crop((crop_h, crop_w))

    def op(example: Example, rng: np.random.Generator | None = None) -> Example:
        image = example["image"]
        height, width = image.shape[:2]
        if crop_h == crop_w:
            short = int(np.floor(crop_h / crop_pct))
            if height <= width:
                new_h, new_w = short, int(short * width / height)
            else:
                new_h, new_w = int(short * height / width), short
        else:
            new_h, new_w = int(np.floor(crop_h / crop_pct)), int(np.floor(crop_w / crop_pct))
        if (new_h, new_w) != (height, width):
            image = _resize(image, new_h, new_w, interpolation)
        return crop({**example, "image": image})

    return op


@TRANSFORMS.register
def decode() -> Op:
    """Encoded image bytes in `image` -> uint8 RGB [H, W, 3] (zoo/data/decode.py); arrays
    pass through. For sources that store encoded files; folders decode when read."""
    from zoo.data.decode import decode_image

    def op(example: Example, rng: np.random.Generator | None = None) -> Example:
        image = example["image"]
        if isinstance(image, bytes | np.bytes_):
            return {**example, "image": decode_image(bytes(image))}
        return example

    return op


@TRANSFORMS.register
def random_erasing(
    prob: float = 0.25,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
    mode: str = "pixel",
    max_count: int = 1,
) -> Op:
    """Random erasing (Zhong et al. 2020), timm's RandomErasing on uint8 host images: with
    probability `prob`, up to `max_count` boxes of area fraction in `scale` and aspect ratio
    log-uniform in `ratio` are filled with per-pixel uniform noise ("pixel"), one random
    colour per box ("rand") or zeros ("const"). (timm draws normal noise after normalisation;
    uniform 0..255 noise is its host-side counterpart.)"""
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"random_erasing mode must be pixel, rand or const, got '{mode}'")
    _probability(prob)
    _require(max_count >= 1, f"max_count must be >= 1, got {max_count}")
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))

    def op(example: Example, rng: np.random.Generator) -> Example:
        if rng.random() >= prob:
            return example
        image = np.array(example["image"])  # a writable copy
        height, width, channels = image.shape
        for _ in range(int(rng.integers(1, max_count + 1))):
            for _attempt in range(10):
                area = height * width * rng.uniform(*scale)
                aspect = np.exp(rng.uniform(*log_ratio))
                h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
                if 0 < h < height and 0 < w < width:
                    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                    shape = {"pixel": (h, w, channels), "rand": (1, 1, channels)}.get(mode)
                    fill = rng.integers(0, 256, shape, dtype=np.uint8) if shape else 0
                    image[top : top + h, left : left + w] = fill
                    break
        return {**example, "image": image}

    return op


@TRANSFORMS.register
def multi_crop(
    global_size: int = 224,
    local_size: int = 96,
    num_global: int = 2,
    num_local: int = 6,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    flip_prob: float = 0.5,
    interpolation: str = "bicubic",
) -> Op:
    """DINO's multi-crop (Caron et al. 2021): `num_global` random resized crops at
    `global_size` and `num_local` at `local_size`, each flipped with `flip_prob`.

    The views replace `image`: the global crops are `image`, `image_1`, ..., then the local
    crops follow (`image_{num_global}`, ...); every view batches to its own array and the
    device ops (normalisation, colour ops) apply to each.
    """
    _positive_size(global_size, "global_size")
    _positive_size(local_size, "local_size")
    _probability(flip_prob, "flip_prob")
    _require(num_global >= 0 and num_local >= 0, "num_global and num_local must be >= 0")
    sizes = [(global_size, global_scale)] * num_global + [(local_size, local_scale)] * num_local
    if not sizes:
        raise ValueError("multi_crop needs at least one view")
    crops = [random_resized_crop(size, scale, interpolation=interpolation) for size, scale in sizes]
    flip_op = flip(flip_prob)

    def op(example: Example, rng: np.random.Generator) -> Example:
        out = {k: v for k, v in example.items() if k != "image"}
        for i, crop in enumerate(crops):
            view = flip_op(crop(example, rng), rng)["image"]
            out["image" if i == 0 else f"image_{i}"] = view
        return out

    return op


@TRANSFORMS.register
def rand_augment(
    num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5
) -> Op:
    """RandAugment (Cubuk et al. 2020) with timm's increasing op set ("rand-m9-mstd0.5-inc1"):
    see zoo/data/rand_augment.py."""
    from zoo.data.rand_augment import rand_augment_op

    _require(num_ops >= 0, f"num_ops must be >= 0, got {num_ops}")
    _probability(prob)
    return rand_augment_op(num_ops, magnitude, magnitude_std, prob)


def resolve_data_config(model_name: str, image_size: int | None = None) -> dict[str, Any]:
    """Eval preprocessing of a model's pretrained weights, as timm's resolve_data_config.

    Returns {"input_size": (H, W, C), "crop_pct", "mean", "std", "interpolation",
    "eval_ops": "resize_center_crop(...)"}: resize the short side to size / crop_pct, take the
    central crop, normalise by mean/std. Models without pretrained metadata get timm's
    defaults (224, 0.875, ImageNet mean/std, bilinear). `image_size` overrides the size.
    """
    from zoo.models import model_entry

    pretrained = model_entry(model_name).pretrained
    if pretrained is None:
        from zoo.models.registry import PretrainedConfig

        pretrained = PretrainedConfig()
    height, width, channels = pretrained.input_size
    size = image_size or height
    ops = (
        f"resize_center_crop(size={size}, crop_pct={pretrained.crop_pct}, "
        f"interpolation='{pretrained.interpolation}')"
    )
    return {
        "input_size": (size, size if image_size else width, channels),
        "crop_pct": pretrained.crop_pct,
        "mean": tuple(pretrained.mean),
        "std": tuple(pretrained.std),
        "interpolation": pretrained.interpolation,
        "eval_ops": ops,
    }


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
                f"cannot parse transform '{text}' in '{spec}': write ops as name or "
                "name(key=value, ...) with literal values (numbers, 'strings', tuples) joined "
                "by '|', e.g. 'random_crop(padding=4)|flip'"
            ) from None
        ops.append((node.func.id, kwargs))
    return ops


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a literal from a config fits an op argument's annotation (int, float, str,
    bool, None, tuples and unions of them); anything else is not checked."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_fits, value, args))
    if annotation is type(None):
        return value is None
    if annotation is int:  # a bool is not an int here
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # an int is a float too
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _check_arguments(name: str, factory: Callable[..., Op], kwargs: dict[str, Any]) -> None:
    """Unknown, missing and mistyped arguments of op `name`, named with what it takes."""
    parameters = inspect.signature(factory).parameters
    for key in kwargs:
        if key not in parameters:
            close = difflib.get_close_matches(key, list(parameters), n=1)
            takes = ", ".join(
                p if v.default is v.empty else f"{p}={v.default!r}" for p, v in parameters.items()
            )
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"transform '{name}' has no argument '{key}'; {hint}it takes {takes}")
    missing = [p for p, v in parameters.items() if v.default is v.empty and p not in kwargs]
    if missing:
        needs = ", ".join(f"{m}=..." for m in missing)
        raise ValueError(f"transform '{name}' needs {needs}, e.g. '{name}({needs})'")
    hints = typing.get_type_hints(factory)
    for key, value in kwargs.items():
        if key in hints and not _fits(value, hints[key]):
            kind = hints[key].__name__ if isinstance(hints[key], type) else str(hints[key])
            raise ValueError(f"transform '{name}': {key} takes {kind}, got {value!r}")


def build_ops(spec: str, key: str = "") -> list[Op]:
    """The ops named in `spec`, validated before any image is read: unknown names (with close
    matches), unknown, missing or mistyped arguments and values out of range are ValueErrors
    naming the op, and `key` (the config key of `spec`, e.g. "data.train_ops") when given."""
    where = f"{key}='{spec}': " if key else ""
    built = []
    try:
        for name, kwargs in parse_ops(spec):
            factory = TRANSFORMS.get(name)
            _check_arguments(name, factory, kwargs)
            try:
                built.append(factory(**kwargs))
            except (TypeError, ValueError) as e:  # the op's own checks of its values
                raise ValueError(f"transform '{name}': {e}") from None
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    return built


def compose(ops: list[Op]) -> Op:
    def apply(example: Example, rng: np.random.Generator) -> Example:
        for op in ops:
            example = op(example, rng)
        return example

    return apply
