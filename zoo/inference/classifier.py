"""A classifier: a model, its variables, its eval preprocessing and its classes.

    classifier = Classifier(model, variables, Preprocessing.from_pretrained(config), names)
    classifier.predict(["shoe.jpg"], top_k=3)
    # [[('Sneaker', 0.91...), ('Sandal', ...), ('Ankle boot', ...)]]

`zoo.load_classifier` (zoo/inference/loading.py) builds one from a training workdir or from
pretrained weights.

Preprocessing (`Preprocessing`) turns any image into what the model saw at eval time: decode
to RGB as the data pipeline does (zoo/data/decode.py), convert to the model's channels (a colour
photo becomes grayscale for a Fashion-MNIST model), resize and centre-crop it to the size of a
dataset of fixed-size images, apply the run's `data.eval_ops` (the same ops as training's eval
pipeline, e.g. `resize_center_crop`, which is pixel-identical to timm's eval transform), scale
to [0, 1] and normalise by mean/std. The forward pass and the softmax/sigmoid are one `jax.jit`
function, compiled once per batch shape; batches are padded to a fixed size so a long list of
images compiles once. Several classifiers of the same classes average their probabilities in
an `Ensemble`; `tta="flip"` averages each image with its mirror image.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from zoo import cpu
from zoo.data.decode import ImageDecodeError, _to_rgb, check_size, decode_file
from zoo.data.transforms import build_ops, resize_center_crop
from zoo.models.registry import PretrainedConfig

ImageLike = str | os.PathLike | Image.Image | np.ndarray
TASKS = ("multiclass", "binary", "multilabel")
TTA_MODES = ("flip",)


def load_image(image: ImageLike) -> np.ndarray:
    """uint8 RGB [H, W, 3] from a path, a PIL image or an array, decoded as training decodes
    files (EXIF orientation applied to files, transparency composited on white).

    Arrays are HxW or HxWxC (C = 1, 3 or 4), uint8, or float in [0, 1].

    Raises:
      ValueError: naming the path (or describing the array) when it is not a readable image.
    """
    if isinstance(image, Image.Image):
        _check_size(*image.size, "PIL image")
        return np.asarray(_to_rgb(image), dtype=np.uint8)
    if isinstance(image, np.ndarray):
        array = image
        if np.issubdtype(array.dtype, np.floating):
            array = np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0)
            array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        shape_ok = array.ndim == 2 or array.ndim == 3 and array.shape[-1] in (3, 4)
        if array.dtype != np.uint8 or not shape_ok or array.size == 0:
            raise ValueError(
                f"expected an HxW or HxWxC (C = 1, 3, 4) uint8 or float array, "
                f"got {image.dtype} {image.shape}"
            )
        _check_size(array.shape[1], array.shape[0], "array")
        if array.ndim == 3 and array.shape[-1] == 3:
            return array
        return np.asarray(_to_rgb(Image.fromarray(array)), dtype=np.uint8)
    path = os.fspath(image)
    try:
        return decode_file(path)
    except ImageDecodeError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def _check_size(width: int, height: int, what: str) -> None:
    """An in-memory image within decoding's limits (zoo/data/decode.py `check_size`)."""
    try:
        check_size(width, height)
    except ImageDecodeError as e:
        raise ValueError(f"{what}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """A model's eval preprocessing: uint8 RGB [H, W, 3] -> float32 [h, w, channels].

    Attributes:
      ops: host per-image ops in the language of zoo/data/transforms.py, e.g.
        "resize_center_crop(size=224, crop_pct=0.875, interpolation='bicubic')".
      mean, std: per-channel normalisation in [0, 1] units.
      channels: 1 (grayscale, ITU-R 601-2 luma as Pillow's "L") or 3.
      stored_size: (height, width) of a dataset of fixed-size images: other sizes are first
        resized (short side) and centre-cropped to it, as the model never saw other sizes.
    """

    ops: str = ""
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    channels: int = 3
    stored_size: tuple[int, int] | None = None

    @classmethod
    def from_pretrained(cls, config: PretrainedConfig) -> Preprocessing:
        """timm's eval transform of pretrained weights: resize, centre crop, normalise."""
        height, width, channels = config.input_size
        size = height if height == width else (height, width)
        ops = (
            f"resize_center_crop(size={size}, crop_pct={config.crop_pct}, "
            f"interpolation='{config.interpolation}')"
        )
        return cls(ops, tuple(config.mean), tuple(config.std), channels)

    @functools.cached_property
    def _ops(self) -> list[Any]:
        ops = build_ops(self.ops)
        if self.stored_size is not None:
            ops.insert(0, resize_center_crop(self.stored_size, crop_pct=1.0))
        return ops

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] (see `load_image`) -> float32 [h, w, channels], normalised."""
        if self.channels == 1:
            image = np.asarray(Image.fromarray(image).convert("L"))[..., None]
        elif self.channels != 3:
            raise ValueError(f"models with {self.channels} input channels are not supported")
        example = {"image": image}
        for op in self._ops:  # eval ops are deterministic; some take an rng anyway
            example = op(example, np.random.default_rng(0))
        pixels = np.asarray(example["image"], np.float32) / 255.0
        return (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def output_shape(self) -> tuple[int, int, int]:
        """[h, w, channels] of every preprocessed image.

        Raises:
          ValueError: when the ops do not give one size whatever the input size.
        """
        shapes = {self(np.zeros(size, np.uint8)).shape for size in [(300, 400, 3), (97, 64, 3)]}
        if len(shapes) != 1:
            raise ValueError(
                f"eval preprocessing '{self.ops}' does not give images of one size (the "
                "dataset's images vary in size); a run on such data needs data.eval_ops with "
                "a fixed output size, e.g. 'resize_center_crop(size=224)'"
            )
        return shapes.pop()


def eval_transform(image: Image.Image, config: PretrainedConfig | Preprocessing) -> np.ndarray:
    """One image preprocessed as the model expects it: float32 [H, W, C], normalised."""
    if isinstance(config, PretrainedConfig):
        config = Preprocessing.from_pretrained(config)
    return config(load_image(image))


def rank(
    probabilities: np.ndarray, class_names: Sequence[str], top_k: int
) -> list[list[tuple[str, float]]]:
    """Per row, the `top_k` (label, probability) pairs, most probable first (ties: lower index)."""
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top_k]
    return [
        [(class_names[int(i)], float(p[i])) for i in row]
        for p, row in zip(probabilities, order, strict=True)
    ]


def decide(
    probabilities: np.ndarray, class_names: Sequence[str], task: str, threshold: float
) -> list[list[str]]:
    """Per row, the predicted labels: the most probable class (multiclass); the positive
    class when its probability is at or above `threshold`, else the negative one (binary);
    every label at or above `threshold` (multilabel, possibly none). The rule is evaluation's
    (`zoo.methods.supervised.is_positive`)."""
    if task == "multiclass":
        return [[class_names[int(i)]] for i in np.argmax(probabilities, axis=-1)]
    from zoo.methods.supervised import is_positive  # not at import: zoo.methods pulls in optax

    positive = is_positive(np.asarray(probabilities, np.float32), threshold)
    if task == "binary":
        return [[class_names[1] if p[1] else class_names[0]] for p in positive]
    return [[class_names[i] for i in np.flatnonzero(p)] for p in positive]


def _probabilities_fn(variables: Any, images: jax.Array, *, model: Any, task: str):
    """[B, H, W, C] -> [B, num_classes] probabilities."""
    logits = model.apply(variables, images, train=False).astype(jnp.float32)
    if task == "multiclass":
        return jax.nn.softmax(logits, axis=-1)
    if task == "binary":  # [B, 1] -> [B, 2] = (1 - p, p): (negative, positive)
        positive = jax.nn.sigmoid(logits[:, 0])
        return jnp.stack([1.0 - positive, positive], axis=-1)
    return jax.nn.sigmoid(logits)


@functools.cache
def _probabilities_jit():
    """The jitted `_probabilities_fn`, one per process and keyed by the (hashable) module, so
    classifiers of one architecture, e.g. an ensemble's, share one compilation. Built on first
    use, for JAX's default device (zoo's CPU policy and forward options where it is a CPU)."""
    device = jax.local_devices()[0]
    return jax.jit(
        cpu.traced(_probabilities_fn, cpu.policy_for([device])),
        static_argnames=("model", "task"),
        compiler_options=cpu.forward_compiler_options(device.platform),
    )


class Classifier:
    """A model, its variables, its preprocessing and its classes; `predict` ranks labels.

    Args:
      model: the flax module.
      variables: its variables ({'params', ['batch_stats']}).
      preprocessing: the eval preprocessing (`Preprocessing`).
      class_names: one name per class (binary: (negative, positive)); None labels classes by
        their index.
      task: "multiclass" (softmax), "binary" (one logit, sigmoid) or "multilabel" (sigmoid
        per label).
      threshold: probability at which a binary/multilabel output counts as positive.
      batch_size: images per forward pass; every pass has this shape (padded), so one
        compilation serves any number of images.
      description: where the classifier came from, for headers ("resnet8 from runs/x ...").
    """

    def __init__(
        self,
        model: Any,
        variables: Any,
        preprocessing: Preprocessing,
        class_names: Sequence[str] | None = None,
        *,
        task: str = "multiclass",
        threshold: float = 0.5,
        batch_size: int = 32,
        description: str = "",
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got '{task}'")
        num_outputs = model.num_classes
        num_classes = 2 if task == "binary" else num_outputs
        if class_names is None:
            class_names = [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a {task} model with {num_outputs} "
                f"output(s); give {num_classes} names"
                + (" (negative, positive)" if task == "binary" else "")
            )
        self.model = model
        self.variables = variables
        self.preprocessing = preprocessing
        self.class_names = list(class_names)
        self.task = task
        self.threshold = float(threshold)
        self.batch_size = batch_size
        self.description = description or getattr(model, "name", None) or type(model).__name__

    def preprocess(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Images -> float32 [B, H, W, C], as the model expects them."""
        return np.stack([self.preprocessing(load_image(image)) for image in images])

    def probabilities(self, images: ImageLike | Sequence[ImageLike], tta: str | None = None):
        """Class probabilities [B, num_classes] in `class_names` order: softmax (multiclass),
        (1 - p, p) (binary), a sigmoid per label (multilabel).

        Args:
          images: paths, PIL images or arrays (any size and mode); one or a list.
          tta: "flip" averages the probabilities of each image and its mirror image.
        """
        images = _as_list(images)
        _check_tta(tta)
        arrays = [load_image(image) for image in images]
        probabilities = self._forward(self.preprocess(arrays))
        if tta == "flip":
            flipped = self._forward(self.preprocess([a[:, ::-1] for a in arrays]))
            probabilities = (probabilities + flipped) / 2.0
        return probabilities

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        chunk = min(self.batch_size, len(batch))
        out = []
        for start in range(0, len(batch), chunk):
            part = batch[start : start + chunk]
            padded = np.concatenate(
                [part, np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)]
            )
            probs = _probabilities_jit()(
                self.variables, jnp.asarray(padded), model=self.model, task=self.task
            )
            out.append(np.asarray(probs)[: len(part)])
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    def predict(
        self, images: ImageLike | Sequence[ImageLike], top_k: int = 5, tta: str | None = None
    ) -> list[list[tuple[str, float]]]:
        """Per image, the `top_k` classes as (label, probability), most probable first.

        Args:
          images: paths, PIL images or arrays (HxWxC uint8, or float in [0, 1]); one or a list.
          top_k: how many classes per image.
          tta: "flip" for test-time augmentation with the mirror image.

        Raises:
          ValueError: naming the path of an image that cannot be read.
        """
        return rank(self.probabilities(images, tta), self.class_names, top_k)

    def decide(self, probabilities: np.ndarray) -> list[list[str]]:
        """The predicted labels of each row of `probabilities` (see `decide`)."""
        return decide(probabilities, self.class_names, self.task, self.threshold)


class Ensemble:
    """Classifiers of the same classes and task; probabilities are their mean.

    Each member keeps its own preprocessing, so members may differ in input size.
    """

    def __init__(self, classifiers: Sequence[Classifier], *, threshold: float | None = None):
        if not classifiers:
            raise ValueError("an ensemble needs at least one classifier")
        first = classifiers[0]
        for other in classifiers[1:]:
            if other.task != first.task or other.class_names != first.class_names:
                raise ValueError(
                    "ensemble members must have the same task and classes: "
                    f"{first.description} is {first.task} with {len(first.class_names)} classes "
                    f"({_preview(first.class_names)}), {other.description} is {other.task} with "
                    f"{len(other.class_names)} classes ({_preview(other.class_names)})"
                )
        self.classifiers = list(classifiers)
        self.class_names = first.class_names
        self.task = first.task
        self.threshold = first.threshold if threshold is None else float(threshold)
        self.description = f"ensemble of {len(classifiers)}: " + ", ".join(
            c.description for c in classifiers
        )

    def probabilities(self, images: ImageLike | Sequence[ImageLike], tta: str | None = None):
        """The members' mean probabilities [B, num_classes] (see `Classifier.probabilities`)."""
        arrays = [load_image(image) for image in _as_list(images)]  # decoded once for all
        return np.mean([c.probabilities(arrays, tta) for c in self.classifiers], axis=0)

    def predict(
        self, images: ImageLike | Sequence[ImageLike], top_k: int = 5, tta: str | None = None
    ) -> list[list[tuple[str, float]]]:
        """Per image, the `top_k` (label, mean probability) pairs, most probable first."""
        return rank(self.probabilities(images, tta), self.class_names, top_k)

    def decide(self, probabilities: np.ndarray) -> list[list[str]]:
        return decide(probabilities, self.class_names, self.task, self.threshold)


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        return [images]
    return list(images)


def _check_tta(tta: str | None) -> None:
    if tta is not None and tta not in TTA_MODES:
        raise ValueError(f"tta must be None or one of {', '.join(TTA_MODES)}, got '{tta}'")


def _preview(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
