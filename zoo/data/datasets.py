"""DATASETS: name -> spec (source per split, number of classes, class names, task).

    spec = get_dataset("fashion_mnist_mini")
    source = spec.source("train", data_config)   # random-access, for grain

Adding a dataset = one `DATASETS.register(DatasetSpec(...))` with a function that returns a
random-access source for a split (see zoo/data/sources.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from zoo.data import sources
from zoo.registry import Registry

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline and the method need to know about a dataset.

    Attributes:
      name: registry name.
      load: `load(split, data_config) -> source` (random-access, examples
        `{"image": uint8 [H, W, C], "label": int}`).
      splits: split names, e.g. {"train": "train", "test": "test"} (role -> split).
      num_classes: number of classes.
      class_names: a name per class.
      task: "multiclass", "binary" or "multilabel".
      image_shape: [H, W, C] of the stored images (None when sizes vary).
      mean, std: per-channel statistics in [0, 1] units for normalisation.
    """

    name: str
    load: Callable[[str, Any], Any]
    splits: dict[str, str]
    num_classes: int
    class_names: tuple[str, ...] | Callable[[], tuple[str, ...]]  # or a function giving them
    task: str = "multiclass"
    image_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def source(self, role: str, data_config: Any = None):
        """The random-access source of the split playing `role` ("train" or "eval")."""
        if role not in self.splits:
            raise ValueError(
                f"dataset '{self.name}' has no '{role}' split; it has: {', '.join(self.splits)}"
            )
        return self.load(self.splits[role], data_config)

    def names(self) -> tuple[str, ...]:
        """The class names (resolved on first use when they come from dataset metadata)."""
        return self.class_names() if callable(self.class_names) else self.class_names


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS.register(spec, name=spec.name)
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered as `name`; ValueError with close matches for an unknown name."""
    return DATASETS.get(name)


# Fashion-MNIST statistics of the training set, in [0, 1] units.
_FMNIST_STATS = dict(mean=(0.2860,), std=(0.3530,))

register_dataset(
    DatasetSpec(
        name="fashion_mnist_mini",
        load=lambda split, _: sources.embedded_source("fashion_mnist_mini", split),
        splits={"train": "train", "eval": "test"},
        num_classes=10,
        class_names=FASHION_MNIST_CLASSES,
        image_shape=(28, 28, 1),
        **_FMNIST_STATS,
    )
)

register_dataset(
    DatasetSpec(
        name="fashion_mnist",
        load=lambda split, cfg: sources.fashion_mnist_source(
            split, (cfg.get("data_dir") if cfg is not None else None) or None
        ),
        splits={"train": "train", "eval": "test"},
        num_classes=10,
        class_names=FASHION_MNIST_CLASSES,
        image_shape=(28, 28, 1),
        **_FMNIST_STATS,
    )
)


def _tfds_loader(tfds_name: str):
    def load(split: str, cfg: Any):
        return sources.TfdsSource(
            tfds_name,
            split,
            data_dir=(cfg.get("data_dir") if cfg is not None else None) or None,
            download=bool(cfg.get("download", True)) if cfg is not None else True,
        )

    return load


def _tfds_class_names(tfds_name: str):
    def names() -> tuple[str, ...]:
        import tensorflow_datasets as tfds

        return tuple(tfds.builder(tfds_name).info.features["label"].names)

    return names


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

register_dataset(
    DatasetSpec(
        name="imagenet2012",
        load=_tfds_loader("imagenet2012"),
        splits={"train": "train", "eval": "validation"},
        num_classes=1000,
        class_names=_tfds_class_names("imagenet2012"),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
)
