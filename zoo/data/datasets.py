"""DATASETS: name -> spec (source per split, number of classes, class names, task).

    spec = get_dataset("cifar10")                 # a registered name
    spec = get_dataset("tfds:caltech101", cfg)    # any prepared tfds dataset
    spec = get_dataset("folder:/data/pets", cfg)  # an image folder (see `folder_dataset`)
    spec = dataset_from_config(config.data)       # a run's: data.name against its config
    source = spec.source("train", data_config)    # random-access, for grain

Registered: the embedded `fashion_mnist_mini`, its binary `fashion_mnist_mini_footwear`
(sandal, sneaker, ankle boot vs the rest) and multi-label `fashion_mnist_mini_mosaic` (2x2
mosaics labelled with the classes present), `fashion_mnist` (the official IDX files) and
tfds datasets read with `tfds.data_source` (cifar10, cifar100, mnist, tfds_fashion_mnist,
imagenet2012, imagenette, oxford_flowers102, oxford_iiit_pet, stl10, food101, eurosat).
Datasets without an eval split (eurosat, folders without val/) hold out a seeded
`data.eval_fraction` of the training split (seed `data.split_seed`).

Adding a dataset = one `register_dataset(DatasetSpec(...))` with a function that returns a
random-access source for a split (see zoo/data/sources.py).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from zoo.data import mosaic, sources
from zoo.registry import Registry

# Split names that stand for a seeded hold-out of the "train" split (sources.holdout_split).
HOLDOUT_TRAIN, HOLDOUT_EVAL = "@holdout:train", "@holdout:eval"

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
      num_classes: number of classes (outputs of the model: 1 for a binary task).
      class_names: a name per class (binary: (negative, positive)), or a function
        `names(data_config) -> tuple` that reads them from dataset metadata on first use.
      task: "multiclass", "binary" or "multilabel" (the `label` format: sources.py).
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

    def names(self, data_config: Any = None) -> tuple[str, ...]:
        """The class names (resolved on first use when they come from dataset metadata)."""
        if callable(self.class_names):
            return tuple(self.class_names(data_config))
        return self.class_names


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS.register(spec, name=spec.name)
    return spec


def get_dataset(name: str, data_config: Any = None) -> DatasetSpec:
    """The spec of `name`: a registered name, "tfds:<tfds name>" or "folder:<path>".

    ValueError with close matches for an unknown registered name. `data_config` (the
    config's `data` namespace) gives data_dir/download for tfds and the split keys for folders,
    and its `mean`/`std`, when set, replace the dataset's normalisation.
    """
    if name.startswith("tfds:"):
        spec = tfds_dataset(name[len("tfds:") :], data_config)
    elif name.startswith("folder:"):
        spec = folder_dataset(name[len("folder:") :], data_config)
    else:
        spec = DATASETS.get(name)
    mean, std = tuple(_get(data_config, "mean", ())), tuple(_get(data_config, "std", ()))
    if mean or std:  # the normalisation of pretrained weights (data.mean / data.std)
        if len(mean) != len(std):
            raise ValueError(f"data.mean {mean} and data.std {std} need one value per channel")
        spec = dataclasses.replace(spec, mean=mean, std=std)
    return spec


def dataset_from_config(data_config: Any) -> DatasetSpec:
    """The spec of a run's dataset: `data.name` resolved against the run's `data` namespace
    (data_dir/download, folder layout, mean/std; see `get_dataset`). Entry points resolve it
    once and pass the spec on (`zoo.training.loop.build`, the pipeline, the evaluators)."""
    return get_dataset(data_config.name, data_config)


def _get(cfg: Any, key: str, default: Any) -> Any:
    return cfg.get(key, default) if cfg is not None else default


def _holdout(source: Any, split: str, cfg: Any) -> Any:
    """`source` itself, or its seeded train/eval part when `split` is a hold-out split."""
    if split not in (HOLDOUT_TRAIN, HOLDOUT_EVAL):
        return source
    parts = sources.holdout_split(
        len(source), _get(cfg, "eval_fraction", 0.1), _get(cfg, "split_seed", 0)
    )
    return sources.SubsetSource(source, parts["train" if split == HOLDOUT_TRAIN else "eval"])


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


# Binary and multi-label tasks on the embedded images (zoo/data/mosaic.py).
FOOTWEAR_CLASSES = (5, 7, 9)  # Sandal, Sneaker, Ankle boot


def _footwear(split: str, _: Any):
    embedded = sources.embedded_source("fashion_mnist_mini", split)
    return mosaic.LabelMapSource(embedded, lambda label: np.int32(label in FOOTWEAR_CLASSES))


def _mosaics(split: str, _: Any):
    # Fixed seeds per split: the dataset is the same whatever the training seed.
    embedded = sources.embedded_source("fashion_mnist_mini", split)
    return mosaic.MosaicSource(embedded, num_classes=10, seed={"train": 0, "test": 1}[split])


register_dataset(
    DatasetSpec(
        name="fashion_mnist_mini_footwear",
        load=_footwear,
        splits={"train": "train", "eval": "test"},
        num_classes=1,
        class_names=("not footwear", "footwear"),
        task="binary",
        image_shape=(28, 28, 1),
        **_FMNIST_STATS,
    )
)

register_dataset(
    DatasetSpec(
        name="fashion_mnist_mini_mosaic",
        load=_mosaics,
        splits={"train": "train", "eval": "test"},
        num_classes=10,
        class_names=FASHION_MNIST_CLASSES,
        task="multilabel",
        image_shape=(56, 56, 1),
        **_FMNIST_STATS,
    )
)


def _tfds_loader(tfds_name: str):
    def load(split: str, cfg: Any):
        tfds_split = "train" if split in (HOLDOUT_TRAIN, HOLDOUT_EVAL) else split
        source = sources.TfdsSource(
            tfds_name,
            tfds_split,
            data_dir=_get(cfg, "data_dir", None) or None,
            download=bool(_get(cfg, "download", True)),
        )
        return _holdout(source, split, cfg)

    return load


def _tfds_class_names(tfds_name: str):
    def names(cfg: Any = None) -> tuple[str, ...]:
        import tensorflow_datasets as tfds

        data_dir = _get(cfg, "data_dir", None) or None
        return tuple(tfds.builder(tfds_name, data_dir=data_dir).info.features["label"].names)

    return names


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_HOLDOUT = {"train": HOLDOUT_TRAIN, "eval": HOLDOUT_EVAL}

# name: (tfds name, {role: split}, classes, stored [H, W, C] or None, mean, std)
_TFDS_DATASETS = {
    "cifar10": ("cifar10", {"train": "train", "eval": "test"}, 10, (32, 32, 3),
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar100", {"train": "train", "eval": "test"}, 100, (32, 32, 3),
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ("mnist", {"train": "train", "eval": "test"}, 10, (28, 28, 1),
              (0.1307,), (0.3081,)),
    # The tfds copy of Fashion-MNIST ('fashion_mnist' reads the official IDX files).
    "tfds_fashion_mnist": ("fashion_mnist", {"train": "train", "eval": "test"}, 10,
                           (28, 28, 1), *_FMNIST_STATS.values()),
    "imagenet2012": ("imagenet2012", {"train": "train", "eval": "validation"}, 1000, None,
                     IMAGENET_MEAN, IMAGENET_STD),
    "imagenette": ("imagenette", {"train": "train", "eval": "validation"}, 10, None,
                   IMAGENET_MEAN, IMAGENET_STD),
    # The usual protocol: train on train+validation (10 per class each), test on test.
    "oxford_flowers102": ("oxford_flowers102",
                          {"train": "train+validation", "eval": "test", "val": "validation"},
                          102, None, IMAGENET_MEAN, IMAGENET_STD),
    "oxford_iiit_pet": ("oxford_iiit_pet", {"train": "train", "eval": "test"}, 37, None,
                        IMAGENET_MEAN, IMAGENET_STD),
    "stl10": ("stl10", {"train": "train", "eval": "test", "unlabelled": "unlabelled"}, 10,
              (96, 96, 3), IMAGENET_MEAN, IMAGENET_STD),
    "food101": ("food101", {"train": "train", "eval": "validation"}, 101, None,
                IMAGENET_MEAN, IMAGENET_STD),
    # EuroSAT has only a train split: hold out a seeded data.eval_fraction for eval.
    "eurosat": ("eurosat/rgb", _HOLDOUT, 10, (64, 64, 3), IMAGENET_MEAN, IMAGENET_STD),
}  # fmt: skip

for _name, (_tfds_name, _splits, _classes, _shape, _mean, _std) in _TFDS_DATASETS.items():
    register_dataset(
        DatasetSpec(
            name=_name,
            load=_tfds_loader(_tfds_name),
            splits=_splits,
            num_classes=_classes,
            class_names=_tfds_class_names(_tfds_name),
            image_shape=_shape,
            mean=_mean,
            std=_std,
        )
    )


def tfds_dataset(tfds_name: str, data_config: Any = None) -> DatasetSpec:
    """A spec for any tfds dataset with `image` and `label` features ("tfds:<name>").

    The eval split is "test", else "validation", else a seeded hold-out of "train". The
    dataset must be prepared (or preparable: data.download) in data.data_dir.
    """
    builder = sources.tfds_builder(
        tfds_name,
        _get(data_config, "data_dir", None) or None,
        bool(_get(data_config, "download", True)),
    )
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"tfds dataset '{tfds_name}' has features {list(features)}; zoo reads datasets "
            "with an 'image' and a 'label' feature"
        )
    splits = sources.tfds_split_names(builder)
    eval_split = next((s for s in ("test", "validation") if s in splits), None)
    names = tuple(getattr(features["label"], "names", ()) or ())
    shape = tuple(features["image"].shape)
    channels = shape[-1] if shape and shape[-1] else 3
    return DatasetSpec(
        name=f"tfds:{tfds_name}",
        load=_tfds_loader(tfds_name),
        splits={"train": "train", "eval": eval_split} if eval_split else dict(_HOLDOUT),
        num_classes=int(features["label"].num_classes),
        class_names=names or tuple(str(i) for i in range(features["label"].num_classes)),
        image_shape=shape if None not in shape else None,
        mean=IMAGENET_MEAN if channels == 3 else (0.5,),
        std=IMAGENET_STD if channels == 3 else (0.5,),
    )


def folder_dataset(root: str, data_config: Any = None) -> DatasetSpec:
    """A spec for a folder of images ("folder:<path>"), scanned once here.

    Layouts (checked in this order):
      root/labels.csv                  rows `file,label[;label...]`, paths relative to root;
                                       the task is inferred (sources.infer_task): several
                                       labels per file = multilabel, 0/1 = binary
      root/train/labels.csv + root/val/labels.csv   the same, with fixed splits
      root/train/<class>/*, root/val/<class>/*      ImageFolder with fixed splits (also
                                       validation/ or test/ for the eval split)
      root/<class>/*                   ImageFolder; eval = seeded data.eval_fraction hold-out
    Class names are the sorted subfolder names, or the sorted label names of labels.csv.
    Files are decoded when read; unreadable ones are skipped and logged (sources.py).
    """
    folder = pathlib.Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (data.name='folder:{root}')")
    train_dir = next((folder / d for d in sources.TRAIN_DIRS if (folder / d).is_dir()), None)
    eval_dir = next((folder / d for d in sources.EVAL_DIRS if (folder / d).is_dir()), None)
    fixed = train_dir is not None and eval_dir is not None
    parts: dict[str, tuple[list[str], Any]] = {}
    task = "multiclass"
    csv_dirs = [train_dir, eval_dir] if fixed else [folder]
    if all((d / sources.LABELS_FILE).exists() for d in csv_dirs):
        rows = [sources.read_labels_csv(d / sources.LABELS_FILE) for d in csv_dirs]
        all_labels = [labels for _, part in rows for labels in part]
        task = sources.infer_task(all_labels)
        names = tuple(sorted({name for labels in all_labels for name in labels}))
        if task == "binary":
            names = next(
                tuple(sorted(pair))
                for pair in ({"0", "1"}, {"false", "true"}, {"no", "yes"}, {"negative", "positive"})
                if {n.lower() for n in names} <= pair
            )
            all_labels = [[labels[0].lower()] for labels in all_labels]
            rows = [(paths, [[x[0].lower()] for x in part]) for paths, part in rows]
        for role, (paths, labels) in zip(("train", "eval"), rows, strict=False):
            parts[role] = (paths, sources.encode_labels(labels, task, names))
    elif fixed:
        train_paths, train_labels, names = sources.scan_class_folders(train_dir)
        eval_paths, eval_labels, _ = sources.scan_class_folders(eval_dir, names)
        parts = {"train": (train_paths, train_labels), "eval": (eval_paths, eval_labels)}
    else:
        paths, labels, names = sources.scan_class_folders(folder)
        parts = {"train": (paths, labels)}
    if not parts["train"][0]:
        raise ValueError(f"image folder {folder} holds no files")

    def load(split: str, cfg: Any):
        strict = bool(_get(cfg, "strict_decode", False))
        role = "eval" if split == "eval" else "train"
        return _holdout(sources.FolderSource(*parts[role], strict=strict), split, cfg)

    return DatasetSpec(
        name=f"folder:{root}",
        load=load,
        splits={"train": "train", "eval": "eval"} if "eval" in parts else dict(_HOLDOUT),
        num_classes=1 if task == "binary" else len(names),
        class_names=names,
        task=task,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
