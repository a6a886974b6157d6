"""Datasets and the grain pipeline: embedded data, determinism, sharding, resumable iterators."""

import ml_collections
import numpy as np
import pytest

from zoo.data import pipeline, sources, transforms
from zoo.data.datasets import DATASETS, get_dataset


def data_config(**overrides):
    config = dict(
        batch_size=64,
        eval_batch_size=300,
        train_ops="random_crop(padding=2)|flip",
        eval_ops="",
        num_workers=0,
        data_dir="",
        download=False,
    )
    return ml_collections.ConfigDict({**config, **overrides})


def test_embedded_dataset_is_a_stratified_subset_of_fashion_mnist():
    spec = get_dataset("fashion_mnist_mini")
    train, test = spec.source("train"), spec.source("eval")
    assert (len(train), len(test)) == (10_000, 2_000)
    assert train.images.shape == (10_000, 28, 28, 1) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [1000] * 10
    assert np.bincount(test.labels).tolist() == [200] * 10
    assert spec.names()[9] == "Ankle boot"
    # Real images, not noise: class means differ (trousers are narrow, bags are wide).
    means = [train.images[train.labels == c].mean() for c in range(10)]
    assert max(means) - min(means) > 20


@pytest.mark.skipif(
    not (
        sources.pathlib.Path(sources.FASHION_MNIST_IDX_DIR) / "t10k-labels-idx1-ubyte.gz"
    ).exists(),
    reason="needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)",
)
def test_full_fashion_mnist_from_idx_files_contains_the_embedded_test_images():
    full = sources.fashion_mnist_source("test")
    assert len(full) == 10_000 and np.bincount(full.labels).tolist() == [1000] * 10
    mini = get_dataset("fashion_mnist_mini").source("eval")
    index = {image.tobytes(): label for image, label in zip(full.images, full.labels, strict=True)}
    for image, label in zip(mini.images[:50], mini.labels[:50], strict=True):
        assert index[image.tobytes()] == label


def test_missing_idx_files_name_the_debian_package_and_tfds(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        get_dataset("fashion_mnist").source("train", data_config(data_dir=str(tmp_path)))


def test_unknown_dataset_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean: fashion_mnist"):
        get_dataset("fashion_mnst")
    assert "fashion_mnist_mini" in DATASETS


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_same_seed_same_batches_and_other_seed_other_batches():
    spec = get_dataset("fashion_mnist_mini")
    a = take(pipeline.train_iterator(spec, data_config(), seed=3), 3)
    b = take(pipeline.train_iterator(spec, data_config(), seed=3), 3)
    c = take(pipeline.train_iterator(spec, data_config(), seed=4), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    assert a[0]["image"].shape == (64, 28, 28, 1) and a[0]["label"].dtype == np.int32


def test_process_shards_are_disjoint_and_cover_the_dataset():
    spec = get_dataset("fashion_mnist_mini")
    config = data_config(train_ops="", batch_size=100)
    seen = []
    for process_index in range(4):
        it = pipeline.train_iterator(
            spec, config, seed=0, process_index=process_index, process_count=4
        )
        # One epoch: 100 global batches of 100, 25 rows of each per process.
        images = np.concatenate([b["image"] for b in take(it, 100)])
        seen.append({image.tobytes() for image in images})
    assert sum(len(s) for s in seen) == len(set().union(*seen))  # disjoint
    everything = {image.tobytes() for image in spec.source("train").images}
    assert set().union(*seen) == everything  # (the embedded set has no duplicate images)


def test_epochs_are_reshuffled():
    spec = get_dataset("fashion_mnist_mini")
    # An epoch is 10,000 examples, one batch (of each process: the epochs are global).
    it = pipeline.train_iterator(spec, data_config(train_ops="", batch_size=10_000), seed=0)
    first, second = take(it, 2)
    assert sorted(first["label"].tolist()) == sorted(second["label"].tolist())
    assert not np.array_equal(first["label"], second["label"])


def test_repeated_augmentation_repeats_each_example_in_its_batch_and_keeps_the_epoch():
    spec = get_dataset("fashion_mnist_mini")
    plain = data_config(train_ops="", batch_size=10_000, repeated_augmentations=3)
    first, second = take(pipeline.train_iterator(spec, plain, seed=0), 2)
    # One epoch is still 10,000 examples: the first ceil(10,000 / 3) of its order, 3 times each.
    images = first["image"].reshape(len(first["image"]), -1)
    _, counts = np.unique(images, axis=0, return_counts=True)
    assert len(counts) == 3334 and sorted(counts.tolist()) == [1] + [3] * 3333
    np.testing.assert_array_equal(first["image"][0:3], np.repeat(first["image"][:1], 3, 0))
    assert not np.array_equal(first["label"], second["label"])  # the next epoch reshuffles
    # With host ops, the 3 copies (adjacent rows of one batch) get their own crop and flip.
    augmented = data_config(batch_size=30, repeated_augmentations=3)
    batch = next(pipeline.train_iterator(spec, augmented, seed=0))
    groups = batch["image"].reshape(10, 3, -1)
    assert (batch["label"].reshape(10, 3) == batch["label"][::3, None]).all()
    assert (
        sum(not np.array_equal(g[0], g[1]) or not np.array_equal(g[0], g[2]) for g in groups) >= 8
    )
    with pytest.raises(ValueError, match="repeated_augmentations must be an integer >= 1"):
        pipeline.train_iterator(spec, data_config(repeated_augmentations=0), seed=0)


def test_restored_iterator_state_gives_the_same_next_batches():
    spec = get_dataset("fashion_mnist_mini")
    it = pipeline.train_iterator(spec, data_config(), seed=0)
    take(it, 7)
    state = it.get_state()
    expected = take(it, 3)
    resumed = pipeline.train_iterator(spec, data_config(), seed=0)
    resumed.set_state(state)
    for x, y in zip(expected, take(resumed, 3), strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_eval_batches_cover_every_example_once_with_a_mask():
    spec = get_dataset("fashion_mnist_mini")
    batches = list(pipeline.eval_batches(spec, data_config(eval_batch_size=300)))
    assert len(batches) == 7 and all(len(b["mask"]) == 300 for b in batches)
    assert sum(b["mask"].sum() for b in batches) == 2000
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(labels, spec.source("eval").labels)


def test_random_crop_and_flip():
    rng = np.random.default_rng(0)
    image = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
    crop = transforms.random_crop(padding=2)({"image": image}, rng)["image"]
    assert crop.shape == image.shape
    flip = transforms.flip(prob=1.0)
    twice = flip(flip({"image": image}, rng), rng)["image"]
    np.testing.assert_array_equal(twice, image)
    np.testing.assert_array_equal(flip({"image": image}, rng)["image"][:, 0], image[:, -1])


def test_transform_spec_errors_name_the_problem():
    assert transforms.parse_ops("random_crop(padding=4)|flip") == [
        ("random_crop", {"padding": 4}),
        ("flip", {}),
    ]
    with pytest.raises(ValueError, match="unknown transform 'flipp'; did you mean: flip"):
        transforms.build_ops("flipp")
    with pytest.raises(ValueError, match="transform 'flip'"):
        transforms.build_ops("flip(probability=1)")
    with pytest.raises(ValueError, match="cannot parse transform"):
        transforms.build_ops("random_crop(4")


def padded_random_crop(image, padding, size, rng):
    """The reference: np.pad, then the crop (random_crop before it skipped the padding)."""
    height, width = image.shape[:2]
    crop_h, crop_w = (size, size) if size else (height, width)
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top = rng.integers(0, height + 2 * padding - crop_h + 1)
    left = rng.integers(0, width + 2 * padding - crop_w + 1)
    return padded[top : top + crop_h, left : left + crop_w]


@pytest.mark.parametrize("padding, size", [(2, None), (4, None), (0, None), (4, 20), (3, 32)])
def test_random_crop_equals_pad_then_crop(padding, size):
    image = np.random.default_rng(0).integers(1, 256, (28, 28, 3), dtype=np.uint8)
    op = transforms.random_crop(padding=padding, size=size)
    for seed in range(50):
        got = op({"image": image}, np.random.default_rng(seed))["image"]
        want = padded_random_crop(image, padding, size, np.random.default_rng(seed))
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_in_memory_sources_read_without_threads_and_give_the_same_batches(monkeypatch):
    spec = get_dataset("fashion_mnist_mini")
    assert pipeline.in_memory(spec.source("train"))
    assert pipeline.in_memory(get_dataset("fashion_mnist_mini_footwear").source("train"))
    assert pipeline.read_options(spec.source("train")).num_threads == 0
    assert not pipeline.in_memory(sources.SubsetSource([{"image": None}], [0]))
    unthreaded = take(pipeline.train_iterator(spec, data_config(), seed=1), 3)
    monkeypatch.setattr(pipeline, "read_options", lambda source: pipeline.grain.ReadOptions())
    threaded = take(pipeline.train_iterator(spec, data_config(), seed=1), 3)
    for x, y in zip(unthreaded, threaded, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_prefetch_gives_the_same_batches_and_the_state_after_the_last_one_returned():
    spec = get_dataset("fashion_mnist_mini")
    plain = pipeline.train_iterator(spec, data_config(), seed=0)
    expected, states = [], []
    for _ in range(6):
        expected.append(next(plain))
        states.append(plain.get_state())
    prefetch = pipeline.Prefetch(pipeline.train_iterator(spec, data_config(), seed=0), size=2)
    for want, want_state in zip(expected[:4], states[:4], strict=True):
        got = next(prefetch)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
        assert prefetch.get_state() == want_state  # not the state of the batches made ahead
    # Resuming from the prefetcher's state continues with the next batch.
    resumed = pipeline.train_iterator(spec, data_config(), seed=0)
    resumed.set_state(prefetch.get_state())
    np.testing.assert_array_equal(next(resumed)["image"], expected[4]["image"])
    prefetch.close()
    with pytest.raises(StopIteration):
        next(prefetch)


class _Failing:
    def __init__(self):
        self.count = 0

    def get_state(self):
        return {"count": self.count}

    def __next__(self):
        self.count += 1
        if self.count == 3:
            raise OSError("disk gone")
        return self.count


def test_prefetch_applies_fn_and_reraises_the_iterators_error():
    prefetch = pipeline.Prefetch(_Failing(), fn=lambda x: 10 * x)
    assert [next(prefetch), next(prefetch)] == [10, 20]
    assert prefetch.get_state() == {"count": 2}
    with pytest.raises(OSError, match="disk gone"):
        next(prefetch)
