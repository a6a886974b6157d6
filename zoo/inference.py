"""Classify images with a zoo model: eval preprocessing from the weights' metadata, top-k.

    import zoo
    classifier = zoo.load_classifier("efficientnet-lite0.pth", model="tf_efficientnet_lite0")
    classifier.predict(["coffee.jpg"], top_k=3)
    # [[('espresso', 0.95...), ('cup', ...), ('chocolate sauce', ...)]]

Preprocessing is timm's eval transform, done on the host with Pillow and numpy so that the
pixels equal timm's: resize the short side to `floor(size / crop_pct)` with the weights'
interpolation, centre-crop `size`, scale to [0, 1], normalise by mean/std (all from the
model's `PretrainedConfig`). The forward pass and softmax are one `jax.jit` function,
compiled once per batch shape; batches are padded to a fixed size so a long list of images
compiles once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from zoo.data.class_names import load_class_names
from zoo.models.catalog import PretrainedConfig, create_model, model_entry
from zoo.models.pretrained import load_pretrained

ImageLike = str | os.PathLike | Image.Image | np.ndarray

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an array.

    Arrays are HxW or HxWxC (C = 1, 3 or 4), uint8, or float in [0, 1].

    Raises:
      ValueError: naming the path (or describing the array) when it is not a readable image.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ValueError(
                f"expected an HxW(xC) uint8 or float array, got {array.dtype} {array.shape}"
            )
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return Image.fromarray(array).convert("RGB")
    path = os.fspath(image)
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as e:  # missing, unreadable, not an image
        raise ValueError(f"{path}: cannot read image ({e})") from None


def eval_transform(image: Image.Image, config: PretrainedConfig) -> np.ndarray:
    """timm's eval transform ("center" crop mode) -> float32 [H, W, 3], normalised."""
    height, width = config.input_size[:2]
    if config.interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation '{config.interpolation}'")
    # Short side to floor(size / crop_pct), long side int(scale * long / short): torchvision's
    # `Resize(int)` on a PIL image, which timm uses.
    scale = math.floor(min(height, width) / config.crop_pct)
    w, h = image.size
    size = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    if size != image.size:
        image = image.resize(size, INTERPOLATIONS[config.interpolation])
    # torchvision's CenterCrop: offsets rounded half to even.
    left = int(round((image.width - width) / 2.0))
    top = int(round((image.height - height) / 2.0))
    image = image.crop((left, top, left + width, top + height))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    mean = np.asarray(config.mean, np.float32)
    std = np.asarray(config.std, np.float32)
    return (pixels - mean) / std


class Classifier:
    """A model, its variables and its eval metadata; `predict` returns ranked labels.

    Args:
      model: the flax module.
      variables: its variables ({'params', ['batch_stats']}).
      config: eval preprocessing (input size, crop, mean/std, interpolation).
      class_names: one name per class; None labels classes by their index.
      multi_label: sigmoid per class instead of a softmax over classes.
      batch_size: images per forward pass; every pass has this shape (padded), so one
        compilation serves any number of images.
    """

    def __init__(
        self,
        model: Any,
        variables: Any,
        config: PretrainedConfig,
        class_names: Sequence[str] | None = None,
        *,
        multi_label: bool = False,
        batch_size: int = 32,
    ):
        self.model = model
        self.variables = variables
        self.config = config
        self.class_names = list(class_names) if class_names is not None else None
        self.multi_label = multi_label
        self.batch_size = batch_size

        def probabilities(variables, images):
            logits = model.apply(variables, images, train=False)
            return jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits, axis=-1)

        self._probabilities = jax.jit(probabilities)

    def preprocess(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Images -> float32 [B, H, W, 3], as the model expects them."""
        return np.stack([eval_transform(load_image(image), self.config) for image in images])

    def probabilities(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities [B, num_classes] (softmax, or sigmoid when multi-label)."""
        batch = self.preprocess(images)
        chunk = min(self.batch_size, len(batch))
        out = []
        for start in range(0, len(batch), chunk):
            part = batch[start : start + chunk]
            padded = np.concatenate(
                [part, np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)]
            )
            probs = self._probabilities(self.variables, jnp.asarray(padded))
            out.append(np.asarray(probs)[: len(part)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def label(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)

    def predict(
        self, images: ImageLike | Sequence[ImageLike], top_k: int = 5
    ) -> list[list[tuple[str, float]]]:
        """Per image, the `top_k` classes as (label, probability), most probable first.

        Args:
          images: paths, PIL images or arrays (HxWxC uint8, or float in [0, 1]); one or a list.
          top_k: how many classes per image.

        Raises:
          ValueError: naming the path of an image that cannot be read.
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        probabilities = self.probabilities(list(images))
        ranked = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top_k]
        return [
            [(self.label(int(i)), float(p[i])) for i in order]
            for p, order in zip(probabilities, ranked, strict=True)
        ]


def load_classifier(
    weights: str | os.PathLike,
    model: str,
    *,
    class_names: Sequence[str] | None = None,
    batch_size: int = 32,
) -> Classifier:
    """A `Classifier` for pretrained weights of a registered model.

    Args:
      weights: a timm/torch weights file (`.pth`, `.safetensors`, `.npz`; see
        `zoo.load_pretrained`), converted by the model's `from_timm`.
      model: registry name, e.g. "tf_efficientnet_lite0"; its `PretrainedConfig` gives the
        preprocessing and the class-name list.
      class_names: overrides the names from the model's metadata.
      batch_size: images per forward pass.

    Returns:
      The classifier; `classifier.predict(paths)` gives ranked (label, probability) lists.
    """
    if os.path.isdir(weights):
        raise ValueError(f"{os.fspath(weights)} is a directory; expected a weights file")
    entry = model_entry(model)
    config = entry.pretrained or PretrainedConfig()
    module = create_model(model, num_classes=config.num_classes)
    variables = load_pretrained(module, weights, model_name=model)
    if class_names is None and config.label_names:
        names = load_class_names(config.label_names)
        class_names = names if len(names) == config.num_classes else None
    return Classifier(module, variables, config, class_names, batch_size=batch_size)
