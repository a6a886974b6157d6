"""Writes README's example images into the current folder (or the one given):

boot.png, trouser.png   the first ankle boot and trouser of the embedded test split (28 px)
coffee.jpg              scikit-image's coffee photo, JPEG quality 75 (needs scikit-image)

python scripts/example_images.py [FOLDER]
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
from PIL import Image

from zoo.data.datasets import get_dataset

FASHION = {"trouser.png": 1, "boot.png": 9}  # file -> Fashion-MNIST label


def main(folder: pathlib.Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    test = get_dataset("fashion_mnist_mini").source("eval")
    for name, label in FASHION.items():
        first = int(np.flatnonzero(test.labels == label)[0])
        Image.fromarray(test[first]["image"][..., 0]).save(folder / name)
    try:
        import skimage.data
    except ImportError:
        sys.exit("coffee.jpg needs scikit-image: pip install scikit-image (or '.[dev]')")
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.jpg", quality=75)
    print("wrote", ", ".join(str(folder / n) for n in [*FASHION, "coffee.jpg"]))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "."))
