"""Host per-image ops (zoo/data/transforms.py, rand_augment.py): shapes, dtypes, ranges and
the property each must keep; eval preprocessing from a model's pretrained metadata."""

import numpy as np
import pytest
from skimage import data as photos

from zoo.data import rand_augment, transforms

CAT = photos.chelsea()  # uint8 [300, 451, 3]


def rng(seed=0):
    return np.random.default_rng(seed)


def test_crop_box_area_and_aspect_stay_within_bounds():
    generator = rng()
    for _ in range(200):
        top, left, h, w = transforms.sample_crop_box(
            300, 451, (0.2, 0.6), (3 / 4, 4 / 3), generator
        )
        assert top >= 0 and top + h <= 300 and left >= 0 and left + w <= 451
        area = h * w / (300 * 451)
        assert 0.2 - 0.01 <= area <= 0.6 + 0.01 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # Impossible constraints fall back to a centre crop at the nearest allowed aspect ratio.
    assert transforms.sample_crop_box(100, 400, (0.99, 1.0), (1.0, 1.0), generator) == (
        0, 150, 100, 100,
    )  # fmt: skip


def test_random_resized_crop_and_same_seed_same_crop():
    op = transforms.random_resized_crop(size=64)
    a, b = op({"image": CAT}, rng(1))["image"], op({"image": CAT}, rng(1))["image"]
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    gray = op({"image": CAT[..., :1]}, rng(1))["image"]
    assert gray.shape == (64, 64, 1)


def test_resize_center_crop_and_eval_crop():
    resized = transforms.resize(150)({"image": CAT})["image"]
    assert resized.shape == (150, 226, 3)
    assert transforms.resize((32, 48))({"image": CAT})["image"].shape == (32, 48, 3)
    crop = transforms.center_crop(100)({"image": CAT})["image"]
    np.testing.assert_array_equal(crop, CAT[100:200, 176:276])
    assert transforms.center_crop(400)({"image": CAT})["image"].shape == (400, 400, 3)
    evaluated = transforms.resize_center_crop(224, crop_pct=0.875)({"image": CAT})["image"]
    assert evaluated.shape == (224, 224, 3)


@pytest.mark.parametrize("name", list(rand_augment.OPS))
def test_every_rand_augment_op_keeps_shape_and_dtype(name):
    for image in (CAT[:64, :80], CAT[:64, :80, :1]):
        out = rand_augment.apply_op(image, name, 9.0, rng())
        assert out.shape == image.shape and out.dtype == np.uint8


def test_rand_augment_is_seeded_and_changes_images():
    op = transforms.build_ops("rand_augment(num_ops=2, magnitude=9)")[0]
    small = CAT[:64, :80]
    a, b = op({"image": small}, rng(3))["image"], op({"image": small}, rng(3))["image"]
    np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(op({"image": small}, rng(s))["image"], small) for s in range(20)]
    assert sum(changed) >= 10  # each of 2 ops applies with probability 0.5
    assert rand_augment.apply_op(small, "Invert", 0, rng()).tolist() == (255 - small).tolist()
    solarized = rand_augment.apply_op(small, "SolarizeIncreasing", 5.0, rng())  # threshold 128
    np.testing.assert_array_equal(solarized, np.where(small >= 128, 255 - small, small))
    with pytest.raises(ValueError, match="magnitude must be in"):
        transforms.build_ops("rand_augment(magnitude=30)")


def test_random_erasing_fills_one_box_within_scale():
    image = np.full((60, 80, 3), 7, np.uint8)
    out = transforms.random_erasing(prob=1.0, mode="const")({"image": image}, rng())["image"]
    erased = np.all(out == 0, axis=-1)
    rows, cols = np.nonzero(erased)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert box == erased.sum() and 0.02 * 4800 - 60 <= box <= 4800 / 3 + 60
    np.testing.assert_array_equal(image, 7)  # the input is not modified
    unchanged = transforms.random_erasing(prob=0.0)({"image": image}, rng())["image"]
    np.testing.assert_array_equal(unchanged, image)


def test_multi_crop_gives_global_and_local_views():
    op = transforms.build_ops("multi_crop(global_size=64, local_size=24, num_local=3)")[0]
    out = op({"image": CAT, "label": np.int32(3)}, rng())
    assert sorted(out) == ["image", "image_1", "image_2", "image_3", "image_4", "label"]
    assert out["image"].shape == out["image_1"].shape == (64, 64, 3)
    assert all(out[f"image_{i}"].shape == (24, 24, 3) for i in (2, 3, 4))
    assert not np.array_equal(out["image"], out["image_1"])


def test_decode_op_decodes_bytes_and_passes_arrays():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(CAT).save(buffer, format="PNG")
    op = transforms.decode()
    np.testing.assert_array_equal(op({"image": buffer.getvalue()})["image"], CAT)
    assert op({"image": CAT})["image"] is CAT


def test_eval_preprocessing_from_pretrained_metadata():
    from zoo.models import list_models, model_entry

    name = next(n for n in list_models() if model_entry(n).pretrained is not None)
    pretrained = model_entry(name).pretrained
    config = transforms.resolve_data_config(name)
    assert config["input_size"] == tuple(pretrained.input_size)
    assert (config["crop_pct"], config["mean"]) == (pretrained.crop_pct, tuple(pretrained.mean))
    (op,) = transforms.build_ops(config["eval_ops"])
    size = pretrained.input_size[0]
    assert op({"image": CAT}, None)["image"].shape == (size, size, 3)
