"""Random-access sources: what grain reads examples from.

Every source has `__len__` and `__getitem__` (grain's `RandomAccessDataSource` protocol) and
yields examples in one format, whatever the dataset:

    {"image": uint8 [H, W, C],        # C = 3 (RGB) or 1 (grey); H, W may vary per example
     "label": ...}                    # by the dataset's task (DatasetSpec.task):
                                      #   multiclass: int32 scalar, the class index
                                      #   binary:     int32 scalar, 0 or 1 (one logit)
                                      #   multilabel: uint8 [num_classes], multi-hot

or None for an example whose file cannot be decoded (corrupt, truncated, empty, not an
image, a broken link, beyond the size limits of zoo/data/decode.py). The pipeline drops None
examples after the map that reads them (grain `filter`), so a bad file never stops a run; it
is logged once per process with its path and the count of files skipped so far. Whether an
example is dropped depends only on its file, so the same seed still gives the same batches
and a restored iterator state the same next batches.
`data.strict_decode=True` raises with the path instead.

Sources:
  ArraySource   in-memory numpy (embedded data, Fashion-MNIST IDX files): small datasets are
                held in memory, as reading records one at a time is slower than the step.
  TfdsSource    a prepared tfds dataset through `tfds.data_source` (array_record); reading
                needs no TensorFlow.
  FolderSource  image files under a folder, decoded lazily with Pillow (zoo/data/decode.py),
                labelled by subfolder (ImageFolder layout) or by a labels.csv.
  SubsetSource  a seeded subset of another source, for datasets without an eval split.
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
import pathlib
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np

from zoo.data.decode import ImageDecodeError, decode_file

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


class SubsetSource:
    """The examples of `source` at `indices`, in that order."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"SubsetSource({self.source!r}, {len(self)} examples)"


def holdout_split(num_examples: int, eval_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A seeded split of range(num_examples) for datasets without an eval split.

    Returns {"train": sorted indices, "eval": sorted indices} with round(n * eval_fraction)
    eval examples (at least one when eval_fraction > 0). The same (n, fraction, seed) always
    gives the same split, whatever the training seed.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(
            f"data.eval_fraction must be in (0, 1) to hold out an eval split, got {eval_fraction}"
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    num_eval = max(1, int(round(num_examples * eval_fraction)))
    return {"train": np.sort(order[num_eval:]), "eval": np.sort(order[:num_eval])}


# ---------------------------------------------------------------------------------------------
# tfds


def internet_reachable(host: str = "storage.googleapis.com", timeout: float = 2.0) -> bool:
    """Whether `host` answers on port 443 within `timeout` seconds (tfds downloads would
    otherwise retry for minutes on an offline machine before failing)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def prepare_command(name: str, data_dir: str) -> str:
    """The shell command that prepares tfds dataset `name` in `data_dir` as array_record."""
    return (
        'python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{name}', data_dir='{data_dir}', file_format='array_record')"
        '.download_and_prepare()"'
    )


def tfds_builder(name: str, data_dir: str | None = None, download: bool = True):
    """A prepared tfds builder for `name`, preparing it first when allowed and possible.

    Fails at once (not after minutes of retries) with the data dir and the command that
    prepares the dataset when it is not prepared and `download` is false or the machine is
    offline.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        first_line = str(e).strip().splitlines()[0]
        raise ValueError(
            f"tfds has no dataset '{name}' ({first_line}); see "
            "https://www.tensorflow.org/datasets/catalog, or point data.data_dir at the folder "
            "holding a dataset you prepared yourself"
        ) from None
    if builder.is_prepared():
        return builder
    root = str(builder.data_dir_root)
    command = prepare_command(name, root)
    why = None
    if not download:
        why = "data.download is false"
    elif not internet_reachable():
        why = "this machine cannot reach the internet (download would retry for minutes)"
    if why:
        raise FileNotFoundError(
            f"tfds dataset '{name}' is not prepared in data dir {root}, and {why}. Prepare it "
            f"once, on a machine with internet access and `pip install tensorflow`:\n  "
            f"{command}\nthen copy {root}/{name.split('/')[0]} here or set data.data_dir. "
            "Some datasets (e.g. imagenet2012) need their archives downloaded by hand into "
            f"{root}/downloads/manual first: see the dataset's tfds catalogue page."
        )
    builder.download_and_prepare()
    return builder


def tfds_split_names(builder) -> list[str]:
    return list(builder.info.splits.keys()) if builder.info.splits else []


class TfdsSource:
    """A split of a prepared tfds dataset, read with `tfds.data_source` (array_record, random
    access; TensorFlow is not needed to read). Extra features (ids, file names, masks) are
    dropped; examples are {"image": uint8 [H, W, C], "label": int32} (see module docstring).

    Args:
      name: tfds name, optionally with config and version ("eurosat/rgb", "mnist:3.*.*").
      split: a tfds split expression ("train", "train+validation", "train[:90%]").
      data_dir: tfds data dir (default: tfds' own, ~/tensorflow_datasets or $TFDS_DATA_DIR).
      download: prepare the dataset when it is missing (see `tfds_builder`).
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, download: bool = True):
        builder = tfds_builder(name, data_dir, download)
        try:
            self.source = builder.as_data_source(split=split)
        except NotImplementedError as e:  # prepared as tfrecord: data_source needs array_record
            raise ValueError(
                f"tfds dataset '{name}' in {builder.data_dir} is not in array_record format ({e})"
                f". Prepare it again with:\n  {prepare_command(name, str(builder.data_dir_root))}"
            ) from None
        label = builder.info.features["label"]
        self.class_names = tuple(getattr(label, "names", ()) or ())

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[index]
        image = np.asarray(record["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        return {"image": image, "label": np.int32(record["label"])}

    def __repr__(self) -> str:
        return f"TfdsSource({len(self)} examples)"


# ---------------------------------------------------------------------------------------------
# Image folders

TRAIN_DIRS = ("train",)
EVAL_DIRS = ("val", "validation", "test")
LABELS_FILE = "labels.csv"
_log = logging.getLogger(__name__)


def _files_under(folder: pathlib.Path) -> list[str]:
    """Every non-hidden regular file under `folder`, as sorted relative paths."""
    found = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        base = pathlib.Path(directory).relative_to(folder)
        found += [str(base / n) for n in names if not n.startswith(".")]
    return sorted(found)


def scan_class_folders(
    root: pathlib.Path, class_names: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """ImageFolder layout `root/<class>/<files>` -> (paths, int32 labels, class names).

    Class names are the sorted subfolder names, unless given (then a subfolder that is not
    one of them is an error: an eval split must not invent classes).
    """
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        class_names = tuple(found)
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(f"{root} has class folders not in the training split: {unknown}")
    if not class_names:
        raise ValueError(
            f"{root} has no class subfolders; an image folder needs one subfolder per class "
            "(root/<class>/<image>) or a labels.csv (file,label[;label...])"
        )
    paths, labels = [], []
    for index, name in enumerate(class_names):
        if (root / name).is_dir():
            files = _files_under(root / name)
            paths += [str(root / name / f) for f in files]
            labels += [index] * len(files)
    return paths, np.asarray(labels, dtype=np.int32), tuple(class_names)


def read_labels_csv(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
    """labels.csv rows `file,label[;label...]` -> (absolute paths, label lists).

    A header row `file,label` is allowed; file paths are relative to the csv's folder; an
    empty label field is an example with no positive label (multilabel).
    """
    paths, labels = [], []
    with open(path, newline="") as f:
        for line_number, row in enumerate(csv.reader(f), 1):
            if not row or (line_number == 1 and [c.strip() for c in row[:2]] == ["file", "label"]):
                continue
            if len(row) != 2:
                raise ValueError(
                    f"{path}:{line_number}: expected 'file,label[;label...]', got {row}"
                )
            paths.append(str(path.parent / row[0].strip()))
            labels.append([x.strip() for x in row[1].split(";") if x.strip()])
    if not paths:
        raise ValueError(f"{path} lists no files; expected rows 'file,label[;label...]'")
    return paths, labels


def infer_task(labels: Sequence[Sequence[str]]) -> str:
    """multilabel if any row has other than one label; binary if the labels are 0/1 (or
    false/true, no/yes, negative/positive); multiclass otherwise."""
    if any(len(row) != 1 for row in labels):
        return "multilabel"
    values = {row[0].lower() for row in labels}
    for pair in ({"0", "1"}, {"false", "true"}, {"no", "yes"}, {"negative", "positive"}):
        if values <= pair:
            return "binary"
    return "multiclass"


def encode_labels(
    labels: Sequence[Sequence[str]], task: str, class_names: Sequence[str]
) -> np.ndarray:
    """Label-name lists -> the `label` array of the task (see module docstring)."""
    index = {name: i for i, name in enumerate(class_names)}
    missing = sorted({name for row in labels for name in row} - set(index))
    if missing:
        raise ValueError(f"labels {missing} are not among the classes {list(class_names)}")
    if task == "multilabel":
        multi_hot = np.zeros((len(labels), len(class_names)), np.uint8)
        for i, row in enumerate(labels):
            multi_hot[i, [index[name] for name in row]] = 1
        return multi_hot
    if task == "binary":  # class_names = (negative, positive)
        return np.asarray([index[row[0]] for row in labels], np.int32)
    if any(len(row) != 1 for row in labels):
        raise ValueError("a multiclass labels.csv needs exactly one label per file")
    return np.asarray([index[row[0]] for row in labels], np.int32)


class FolderSource:
    """Image files decoded lazily with Pillow, with their labels (see module docstring).

    Args:
      paths: one file per example.
      labels: [N] int32 (multiclass, binary) or [N, K] uint8 multi-hot (multilabel).
      strict: raise on an unreadable file instead of skipping it (returning None).
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, strict: bool = False):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} files but {len(labels)} labels")
        self.paths, self.labels, self.strict = list(paths), np.asarray(labels), strict
        self._skipped: set[str] = set()  # per process (grain workers have their own)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path = self.paths[index]
        try:
            image = decode_file(path)
        except ImageDecodeError as e:
            if self.strict:
                raise ValueError(
                    f"cannot read image {path}: {e} (data.strict_decode=True; set it to False "
                    "to skip unreadable files)"
                ) from None
            if path not in self._skipped:
                self._skipped.add(path)
                _log.warning(
                    "skipping unreadable image %s (%s); %d file(s) skipped so far in this process",
                    path,
                    e,
                    len(self._skipped),
                )
            return None
        return {"image": image, "label": self.labels[index]}

    def __repr__(self) -> str:
        return f"FolderSource({len(self)} files)"
