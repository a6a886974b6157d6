"""Random-access sources: what grain reads examples from.

Every source is a sequence of examples `{"image": uint8 [H, W, C], "label": int}` with
`__len__` and `__getitem__`, which is grain's `RandomAccessDataSource` protocol.
Small datasets are held in numpy (reading records one at a time is slower than the step).
"""

from __future__ import annotations

import gzip
import pathlib
from typing import Any

import numpy as np

EMBEDDED_DIR = pathlib.Path(__file__).parent / "embedded"
FASHION_MNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"


class ArraySource:
    """In-memory images `[N, H, W, C]` uint8 and integer labels `[N]`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim == 3:  # grayscale [N, H, W] -> [N, H, W, 1]
            images = images[..., None]
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}

    def __repr__(self) -> str:
        return f"ArraySource(images={self.images.shape}, labels={self.labels.shape})"


def embedded_source(name: str, split: str) -> ArraySource:
    """A dataset shipped inside the package (zoo/data/embedded/<name>.npz)."""
    with np.load(EMBEDDED_DIR / f"{name}.npz") as arrays:
        return ArraySource(arrays[f"{split}_images"], arrays[f"{split}_labels"])


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """Reads an IDX file (the MNIST format: big-endian dims after a 4-byte magic)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_fashion_mnist_idx(idx_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The official Fashion-MNIST IDX files -> (images uint8 [N, 28, 28], labels [N])."""
    prefix = {"train": "train", "test": "t10k"}[split]
    root = pathlib.Path(idx_dir)
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {candidates[0]} not found. On Debian/Ubuntu, "
                "`apt-get install dataset-fashion-mnist` installs the official files in "
                f"{FASHION_MNIST_IDX_DIR}; or point data.data_dir at a folder holding them; "
                "or use the tfds dataset instead: data.name='tfds:fashion_mnist'."
            )
        paths.append(found)
    return _read_idx(paths[0]), _read_idx(paths[1]).astype(np.int32)


def fashion_mnist_source(split: str, idx_dir: str | None = None) -> ArraySource:
    """The full Fashion-MNIST (60k train / 10k test) from its official IDX files."""
    return ArraySource(*read_fashion_mnist_idx(idx_dir or FASHION_MNIST_IDX_DIR, split))


class TfdsSource:
    """A prepared tfds dataset split read with `tfds.data_source` (array_record; random
    access; TensorFlow is not needed to read). Examples: {"image": uint8 [H, W, C], "label"}."""

    def __init__(self, name: str, split: str, data_dir: str | None = None, download: bool = True):
        import tensorflow_datasets as tfds

        builder = tfds.builder(name, data_dir=data_dir or None)
        if not builder.is_prepared():
            command = (
                f'python -c "import tensorflow_datasets as tfds; '
                f"tfds.builder('{name}', data_dir='{builder.data_dir_root}')"
                f'.download_and_prepare()"'
            )
            if not download:
                raise FileNotFoundError(
                    f"tfds dataset '{name}' is not prepared in {builder.data_dir_root} and "
                    f"data.download is false. Prepare it once with:\n  {command}\n(some "
                    "datasets, e.g. imagenet2012, need their files downloaded by hand first; "
                    "see the tfds catalogue page of the dataset)"
                )
            builder.download_and_prepare()
        self.source = builder.as_data_source(split=split)
        self.class_names = tuple(builder.info.features["label"].names)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        image = np.asarray(record["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        return {"image": image, "label": np.int32(record["label"])}
