"""Every published recipe in configs/ (`*_imagenet.py`) runs: each one's `runlocal` variant
trains 3 steps on the embedded data through the loop, with the recipe's own optimizer,
schedule, loss, EMA and augmentations, so no recipe rots when the library changes."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs.common import load_config_file
from zoo.data import pipeline
from zoo.data.datasets import get_dataset
from zoo.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*_imagenet.py"))
# What `runlocal` may change; everything else must be the published recipe's.
SHRUNK = {"total_steps", "data.name", "data.data_dir", "data.batch_size", "data.eval_batch_size"}
SHRUNK |= {"data.num_workers", "data.train_ops", "data.eval_ops", "model.name"}
SHRUNK |= {"evals.every_steps", "checkpoint.every_steps", "logging.every_steps"}


def flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_there_is_a_recipe_per_family():
    families = {load_config_file(str(path)).model.name.split("_")[0] for path in RECIPES}
    assert families >= {"resnet50", "deit", "vit", "swin", "convnext", "efficientnet"}


# Trained in CI: the SGD and the LAMB + BCE recipes (README's test runs DeiT's through
# train.py; tests/test_ema.py the EMA); the other five train under -m slow (~130 s on 2 cores).
IN_CI = {"resnet50_imagenet", "resnet50_a3_imagenet"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_runlocal_changes_only_the_size_of_the_run(path):
    recipe, local = load_config_file(str(path)), load_config_file(f"{path}:runlocal")
    assert (
        recipe.data.name == "imagenet2012" and f"--config=configs/{path.name}" in path.read_text()
    )
    changed = {k for k, v in flat(recipe).items() if flat(local)[k] != v}
    assert changed <= SHRUNK, f"runlocal changed the recipe itself: {changed - SHRUNK}"


@pytest.mark.parametrize(
    "path",
    [p if p.stem in IN_CI else pytest.param(p, marks=pytest.mark.slow) for p in RECIPES],
    ids=lambda p: p.stem,
)
def test_recipe_runlocal_trains_with_the_recipes_own_settings(path, tmp_path):
    recipe, local = load_config_file(str(path)), load_config_file(f"{path}:runlocal")
    if path.stem == "resnet50_imagenet":  # one recipe through train.py's own config flag
        command = [sys.executable, "train.py", f"--config={path}:runlocal", f"--workdir={tmp_path}"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        results = json.loads((tmp_path / "summary.json").read_text())
        results = {k.removeprefix("eval_"): v for k, v in results.items()}
    else:
        results = loop.run(local, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 3
    assert 0.0 <= results["accuracy"] <= 1.0 and np.isfinite(results["loss"])
    if recipe.optim.ema_decay:  # the EMA model is evaluated beside the raw one
        assert 0.0 <= results["ema_accuracy"] <= 1.0


def test_a3_trains_at_a_lower_resolution_than_it_tests():
    """Touvron et al. 2019's train/test resolution discrepancy: A3 trains at 160 px and tests
    at 224 (runlocal: 24 and 32), the same weights taking both sizes."""
    local = load_config_file(f"{ROOT / 'configs/resnet50_a3_imagenet.py'}:runlocal")
    spec = get_dataset(local.data.name)
    train = next(pipeline.train_iterator(spec, local.data, seed=0))["image"]
    test = next(iter(pipeline.eval_batches(spec, local.data)))["image"]
    assert train.shape[1:3] == (24, 24) and test.shape[1:3] == (32, 32)
