"""Image folders: decoding every image mode, bad files skipped and reported, labels.csv tasks,
train/val layouts, determinism, sharding, resume (also with worker processes), training."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from configs import common
from zoo.data import decode, pipeline
from zoo.data.datasets import get_dataset

PHOTOS = {
    "cat": [photos.chelsea(), photos.astronaut()],
    "cup": [photos.coffee(), photos.rocket()],
    "gray": [photos.camera(), photos.moon()],
}


def save(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def write_folder(root, per_class=6):
    """root/<class>/ with JPEG/PNG/TIFF files of several modes and sizes + bad files."""
    for name, sources in PHOTOS.items():
        for i in range(per_class):
            array = sources[i % 2]
            h, w = array.shape[:2]
            crop = array[i * 7 : h - i * 5, i * 3 : w - i * 9]  # distinct images and sizes
            image = Image.fromarray(crop)
            mode = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"][i % 6]
            if mode == "I;16":
                gray = np.asarray(image.convert("L"), np.uint16) * 257
                save(Image.fromarray(gray), root / name / f"{i}.png")
            elif mode in ("RGBA", "P"):
                save(image.convert(mode), root / name / f"{i}.png")
            elif mode == "CMYK":
                save(image.convert("RGB").convert("CMYK"), root / name / f"{i}.jpg")
            else:
                save(image.convert(mode), root / name / f"{i}.jpg", quality=90)
    good = (root / "cat/0.jpg").read_bytes()
    bad = {
        "cat/truncated.jpg": good[: len(good) // 2],
        "cup/corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "cup/empty.png": b"",
        "gray/notes.txt": b"not an image\n",
    }
    for name, content in bad.items():
        (root / name).write_bytes(content)
    return [str(root / name) for name in bad]


def data_config(**overrides):
    config = common.base().data
    config.unlock()
    config.update(
        dict(batch_size=8, eval_batch_size=8, train_ops="resize(size=(16, 16))|flip",
             eval_ops="resize_center_crop(size=16)", download=False)
    )  # fmt: skip
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, write_folder(root)


def test_decode_turns_every_mode_into_rgb_and_applies_exif_orientation():
    cat = photos.chelsea()  # [300, 451, 3]
    for mode in ("L", "RGBA", "P", "CMYK", "I;16", "1", "LA"):
        image = Image.fromarray(cat)
        if mode == "I;16":
            image = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
        else:
            image = image.convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF" if mode in ("CMYK", "I;16", "LA") else "PNG")
        out = decode.decode_image(buffer.getvalue())
        assert out.shape == (300, 451, 3) and out.dtype == np.uint8, mode
    # 16-bit grey scales to 8 bits (not clipped to white).
    sixteen = Image.fromarray(np.full((4, 4), 128 * 257, np.uint16))
    buffer = io.BytesIO()
    sixteen.save(buffer, format="PNG")
    assert decode.decode_image(buffer.getvalue())[0, 0].tolist() == [128, 128, 128]
    # EXIF orientation 6: the camera was on its side; decoding turns the image upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(cat).save(buffer, format="JPEG", exif=exif)
    assert decode.decode_image(buffer.getvalue()).shape == (451, 300, 3)
    for bad in (b"", b"GIF89a broken", buffer.getvalue()[:2000]):
        with pytest.raises(decode.ImageDecodeError):
            decode.decode_image(bad)


def test_folder_spec_classes_and_seeded_holdout(folder):
    root, _ = folder
    spec = get_dataset(f"folder:{root}", data_config())
    assert spec.names() == ("cat", "cup", "gray") and spec.task == "multiclass"
    train = spec.source("train", data_config(eval_fraction=0.25, split_seed=0))
    eval_ = spec.source("eval", data_config(eval_fraction=0.25, split_seed=0))
    assert len(train) + len(eval_) == 22 and len(eval_) == 6
    assert not set(train.indices) & set(eval_.indices)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_dataset(f"folder:{root}/missing", data_config())


def test_bad_files_are_skipped_and_reported_by_path(folder, caplog):
    root, bad = folder
    spec = get_dataset(f"folder:{root}", data_config())
    config = data_config(eval_fraction=0.01)  # one held-out image: train sees nearly all
    with caplog.at_level(logging.WARNING, logger="zoo.data.sources"):
        it = pipeline.train_iterator(spec, config, seed=0)
        batches = [next(it) for _ in range(6)]  # > 2 epochs of 21 files
    assert all(b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.uint8 for b in batches)
    held_out = spec.source("eval", config).source.paths[spec.source("eval", config).indices[0]]
    reported = [path for path in bad if path != held_out and path in caplog.text]
    assert len(reported) == len([p for p in bad if p != held_out])
    assert "skipped so far" in caplog.text
    # Each bad file is reported once per process, not once per epoch.
    assert sum(caplog.text.count(path) for path in reported) == len(reported)
    with pytest.raises(ValueError, match="cannot read image .*strict_decode"):
        source = spec.source("train", data_config(strict_decode=True, eval_fraction=0.01))
        [source[i] for i in range(len(source))]


def test_same_seed_same_batches_and_shards_cover_the_good_files(folder):
    root, _ = folder
    spec = get_dataset(f"folder:{root}", data_config())
    config = data_config(train_ops="resize(size=(16, 16))", eval_fraction=0.01, batch_size=4)
    a = [next(it) for it in [pipeline.train_iterator(spec, config, seed=1)] for _ in range(3)]
    b = [next(it) for it in [pipeline.train_iterator(spec, config, seed=1)] for _ in range(3)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    seen = []
    for index in range(2):  # two processes: 21 files, 4 bad -> 17 good images
        it = pipeline.train_iterator(spec, config, seed=0, process_index=index, process_count=2)
        # Each reads its 2 rows of every global batch of 4: 5 batches each cover the first
        # 20 positions of the shuffled stream, an epoch of 21 files less the bad ones.
        images = np.concatenate([next(it)["image"] for _ in range(5)])
        seen.append({image.tobytes() for image in images})
    assert seen[0] != seen[1]
    everything = spec.source("train", config)
    good = {
        pipeline.compose(pipeline.build_ops(config.train_ops))(e, None)["image"].tobytes()
        for e in (everything[i] for i in range(len(everything)))
        if e is not None
    }
    assert seen[0] | seen[1] == good


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_restored_iterator_gives_the_same_next_batches(folder, num_workers):
    root, _ = folder
    spec = get_dataset(f"folder:{root}", data_config())
    config = data_config(num_workers=num_workers, train_ops="random_resized_crop(size=16)|flip")
    it = pipeline.train_iterator(spec, config, seed=0)
    [next(it) for _ in range(3)]
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = pipeline.train_iterator(spec, config, seed=0)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    for iterator in (it, resumed):
        if hasattr(iterator, "close"):
            iterator.close()


def test_train_and_val_subfolders_are_the_splits(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for name in ("a", "b"):
            for i in range(count):
                save(
                    Image.fromarray(photos.coffee()[: 40 + i, :50]),
                    tmp_path / split / name / f"{i}.png",
                )
    spec = get_dataset(f"folder:{tmp_path}", data_config())
    assert spec.splits == {"train": "train", "eval": "eval"} and spec.names() == ("a", "b")
    assert (len(spec.source("train")), len(spec.source("eval"))) == (6, 4)
    (tmp_path / "val" / "c").mkdir()
    with pytest.raises(ValueError, match="class folders not in the training split"):
        get_dataset(f"folder:{tmp_path}", data_config())


def test_labels_csv_multilabel_and_binary(tmp_path):
    for i in range(6):
        save(Image.fromarray(photos.astronaut()[: 30 + i, :40]), tmp_path / "img" / f"{i}.png")
    rows = ["file,label", "img/0.png,sky;person", "img/1.png,person", "img/2.png,", "img/3.png,sky"]
    rows += ["img/4.png,tree;sky", "img/5.png,person;tree"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    spec = get_dataset(f"folder:{tmp_path}", data_config())
    assert spec.task == "multilabel" and spec.names() == ("person", "sky", "tree")
    source = spec.source("train", data_config(eval_fraction=0.01))
    labels = {source.source.paths[i][-5:]: source.source.labels[i].tolist() for i in range(6)}
    assert labels["0.png"] == [1, 1, 0] and labels["2.png"] == [0, 0, 0]
    assert source.source.labels.dtype == np.uint8
    it = pipeline.train_iterator(spec, data_config(batch_size=2, eval_fraction=0.2), seed=0)
    batch = next(it)
    assert batch["label"].shape == (2, 3) and batch["label"].dtype == np.uint8

    binary = ["file,label"] + [f"img/{i}.png,{'yes' if i % 2 else 'no'}" for i in range(6)]
    (tmp_path / "labels.csv").write_text("\n".join(binary) + "\n")
    spec = get_dataset(f"folder:{tmp_path}", data_config())
    assert (spec.task, spec.num_classes, spec.names()) == ("binary", 1, ("no", "yes"))
    labels = spec.source("train", data_config(eval_fraction=0.01)).source.labels
    assert labels.dtype == np.int32 and sorted(set(labels.tolist())) == [0, 1]


def test_folder_of_real_images_trains_for_a_few_steps(folder, tmp_path, caplog):
    from zoo.training import loop

    root, bad = folder
    config = common.base()
    config.model.name = "resnet8"
    config.data.name = f"folder:{root}"
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.data.eval_fraction = 0.3
    config.data.train_ops = "random_resized_crop(size=16)|flip|rand_augment(num_ops=2)"
    config.data.eval_ops = "resize_center_crop(size=16)"
    config.total_steps = 2
    config.logging.every_steps = 1
    with caplog.at_level(logging.WARNING, logger="zoo.data.sources"):
        results = loop.run(config, tmp_path)
    assert 0 < results["count"] <= 7  # the held-out files that decode
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 2
    assert any(path in caplog.text for path in bad)
