"""tfds datasets through grain: mock data into the train step, a real array_record dataset
read without TensorFlow, the registered specs, and failing fast when a dataset is missing."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from zoo.data import datasets, sources
from zoo.data.datasets import get_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]


def data_config(**overrides):
    config = common.base().data
    config.unlock()
    config.update(dict(batch_size=16, eval_batch_size=16, train_ops="flip", download=False))
    config.update(overrides)
    return config


def test_registered_tfds_datasets_have_their_splits_and_lazy_class_names():
    expected = {
        "cifar10": ("train", "test", 10),
        "cifar100": ("train", "test", 100),
        "mnist": ("train", "test", 10),
        "tfds_fashion_mnist": ("train", "test", 10),
        "imagenet2012": ("train", "validation", 1000),
        "imagenette": ("train", "validation", 10),
        "oxford_flowers102": ("train+validation", "test", 102),
        "oxford_iiit_pet": ("train", "test", 37),
        "stl10": ("train", "test", 10),
        "food101": ("train", "validation", 101),
        "eurosat": (datasets.HOLDOUT_TRAIN, datasets.HOLDOUT_EVAL, 10),
    }
    for name, (train, eval_, classes) in expected.items():
        spec = get_dataset(name)
        assert (spec.splits["train"], spec.splits["eval"], spec.num_classes) == (
            train,
            eval_,
            classes,
        )
        assert callable(spec.class_names)  # read from tfds metadata only when asked
    assert get_dataset("oxford_flowers102").names()[0] == "pink primrose"
    assert get_dataset("eurosat").names()[:2] == ("AnnualCrop", "Forest")
    # The IDX-file entry stays as it was.
    assert get_dataset("fashion_mnist").class_names[0] == "T-shirt/top"


@pytest.mark.parametrize("download", [False, True])
def test_missing_dataset_fails_at_once_naming_data_dir_and_command(tmp_path, monkeypatch, download):
    # download=True on an offline machine: no minutes of retries either.
    monkeypatch.setattr(sources, "internet_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        get_dataset("cifar10").source(
            "train", data_config(data_dir=str(tmp_path), download=download)
        )
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert str(tmp_path) in message
    assert sources.prepare_command("cifar10", str(tmp_path)) in message
    assert ("data.download is false" if not download else "cannot reach the internet") in message


def test_unknown_tfds_name_is_an_error_naming_it():
    with pytest.raises(ValueError, match="tfds has no dataset 'cifar11'"):
        get_dataset("tfds:cifar11", data_config())


def test_mock_cifar10_trains_through_the_loop(tmp_path, monkeypatch):
    from zoo.training import loop

    monkeypatch.setattr(sources, "internet_reachable", lambda: True)  # mock "download"
    config = common.base()
    config.model.name = "resnet8"
    config.data.name = "cifar10"
    config.data.batch_size = 16
    config.data.eval_batch_size = 16
    config.data.train_ops = "random_crop(padding=4)|flip"
    config.total_steps = 3
    config.logging.every_steps = 1
    config.data.mixup_alpha = 0.8  # soft targets through the supervised loss
    config.data.cutmix_alpha = 1.0
    config.data.color_jitter = 0.4
    with tfds.testing.mock_data(num_examples=48):
        results = loop.run(config, tmp_path)
    assert results["count"] == 48 and 0.0 <= results["accuracy"] <= 1.0
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_mock_eurosat_holds_out_a_seeded_eval_split(monkeypatch):
    monkeypatch.setattr(sources, "internet_reachable", lambda: True)
    spec = get_dataset("eurosat")
    with tfds.testing.mock_data(num_examples=50):
        config = data_config(eval_fraction=0.2, split_seed=1, download=True)
        train, eval_ = spec.source("train", config), spec.source("eval", config)
        again = spec.source("eval", config)
        assert (len(train), len(eval_)) == (40, 10)
        assert not set(train.indices) & set(eval_.indices)
        np.testing.assert_array_equal(eval_.indices, again.indices)
        assert train[0]["image"].shape == (64, 64, 3) and train[0]["label"].dtype == np.int32


BUILD_SCRIPT = """
import sys
import numpy as np
import tensorflow_datasets as tfds
from zoo.data.datasets import get_dataset


class ZooFashionSample(tfds.core.GeneratorBasedBuilder):
    '''A few hundred real Fashion-MNIST images (the embedded set) as a tfds dataset.'''

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({
            # Tensor (not Image): builds without TensorFlow (Image needs TF to encode PNGs).
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(get_dataset("fashion_mnist").names())),
        })
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples("train", 320),
            "test": self._generate_examples("eval", 80),
        }

    def _generate_examples(self, role, count):
        source = get_dataset("fashion_mnist_mini").source(role)
        for i in range(count):
            yield i, {"image": source.images[i], "label": int(source.labels[i])}


ZooFashionSample(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
"""

READ_SCRIPT = """
import sys
import ml_collections
import numpy as np
from zoo.data import pipeline
from zoo.data.datasets import get_dataset

if __name__ == "__main__":
    config = ml_collections.ConfigDict(dict(
        data_dir=sys.argv[1], download=False, batch_size=32, eval_batch_size=50,
        train_ops="flip", eval_ops="", num_workers=int(sys.argv[2]), eval_fraction=0.1,
        split_seed=0, strict_decode=False))
    spec = get_dataset("tfds:zoo_fashion_sample", config)
    mini = get_dataset("fashion_mnist_mini").source("eval")
    test = spec.source("eval", config)
    assert len(test) == 80 and len(spec.source("train", config)) == 320
    # array_record shuffles the record order: compare as sets of (image, label).
    got = {(test[i]["image"].tobytes(), int(test[i]["label"])) for i in range(80)}
    want = {(mini.images[i].tobytes(), int(mini.labels[i])) for i in range(80)}
    assert got == want
    it = pipeline.train_iterator(spec, config, seed=0)
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    expected = next(it)
    it.close() if hasattr(it, "close") else None
    resumed = pipeline.train_iterator(spec, config, seed=0)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], expected["image"])
    resumed.close() if hasattr(resumed, "close") else None
    evals = list(pipeline.eval_batches(spec, config))
    assert sum(b["mask"].sum() for b in evals) == 80
    print(batches[0]["image"].shape, spec.num_classes, spec.names()[0],
          "tensorflow" in sys.modules)
"""


@pytest.fixture(scope="module")
def built_tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(data_dir)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return data_dir


@pytest.mark.parametrize("num_workers", [0, 2])
def test_array_record_dataset_reads_back_without_tensorflow(built_tfds_dir, num_workers):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(READ_SCRIPT), str(built_tfds_dir), str(num_workers)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("(32, 28, 28, 1) 10 T-shirt/top False")
