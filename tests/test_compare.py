"""`python -m zoo.compare`: two tiny models on the embedded dataset, end to end (outputs,
skipping finished models on a rerun, refusing another budget or an unknown model), and the
fitting of a family recipe's optimizer to the comparison's budget."""

import csv
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from configs import common
from zoo import compare

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = "resnet8,vit_nano_patch4_32"
SHORT = [
    "--config=configs/compare_fashion_mnist.py",
    "--config.data.name=fashion_mnist_mini",
    "--config.total_steps=4",
    "--config.data.batch_size=16",
    "--config.checkpoint.every_steps=2",
    "--config.logging.every_steps=2",
]


def run_compare(workdir, *args, status=0):
    env = {**os.environ, "XLA_FLAGS": ""}  # one device, like a user's laptop
    command = [sys.executable, "-m", "zoo.compare", f"--workdir={workdir}", *SHORT, *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == status, output
    return output


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compare")
    return workdir, run_compare(workdir, f"--models={MODELS}")


def test_writes_a_row_per_model_a_table_and_a_plot(compared):
    workdir, output = compared
    assert "[1/2] resnet8" in output and "[2/2] vit_nano_patch4_32" in output
    rows = json.loads((workdir / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == MODELS.split(",")
    for row in rows:
        # The parameters the training loop reported for the model it trained.
        (printed,) = re.findall(rf"zoo: {row['model']} \(([\d,]+) params\)", output)
        assert row["params"] == int(printed.replace(",", ""))
        assert row["mflops"] > 0 and 0 <= row["accuracy"] <= 1
        assert row["steps"] == 4 and row["images_per_second"] > 0 and row["wall_minutes"] > 0
    assert {r["family"] for r in rows} == {"resnet", "vit"}
    with open(workdir / "results.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == MODELS.split(",")
    table = (workdir / "results.md").read_text()
    assert "| resnet8 | resnet |" in table and "| vit_nano_patch4_32 | vit |" in table
    assert "Fashion-MNIST" in table  # the published best, or "not found"
    png = (workdir / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_rerun_skips_finished_models(compared):
    workdir, _ = compared
    summaries = [workdir / name / "summary.json" for name in MODELS.split(",")]
    before = [path.stat().st_mtime_ns for path in summaries]
    output = run_compare(workdir, f"--models={MODELS}")
    assert output.count("finished, skipping") == 2 and "zoo: resnet8" not in output
    assert [path.stat().st_mtime_ns for path in summaries] == before


def test_another_budget_in_the_same_workdir_is_refused(compared):
    workdir, _ = compared
    output = run_compare(workdir, f"--models={MODELS}", "--config.total_steps=5", status=2)
    assert "total_steps: 4 there, 5 here" in output and "another --workdir" in output


def test_unknown_model_is_refused_with_close_matches(tmp_path):
    output = run_compare(tmp_path / "out", "--models=resnet8,resnt20", status=2)
    assert "unknown model 'resnt20'; did you mean: resnet20" in output
    assert not (tmp_path / "out").exists()  # refused before anything was written


def recipe_config():
    """A hand-made recipe: SGD at lr 0.8 for batch 1024, 5 of 100 epochs of warmup."""
    recipe = common.base()
    recipe.data.batch_size = 1024
    recipe.num_epochs = 100.0
    recipe.optim.name = "sgd"
    recipe.optim.lr = 0.8
    recipe.optim.weight_decay = 1e-4
    recipe.optim.grad_accum_steps = 4
    recipe.schedule.warmup_epochs = 5.0
    recipe.schedule.end_lr_factor = 0.01
    recipe.method.label_smoothing = 0.1
    recipe.model.drop_path_rate = 0.05
    recipe.data.train_ops = "random_resized_crop(size=224)|flip"
    return recipe


def comparison_config(**overrides):
    config = common.load_config_file(str(ROOT / "configs/compare_fashion_mnist.py"))
    config.update(overrides)
    config.lock()  # as the command's --config
    return config


def test_fit_recipe_takes_the_optimizer_side_at_the_comparisons_budget():
    config = comparison_config(num_epochs=2.0)
    fitted = compare.fit_recipe(config, recipe_config(), steps_per_epoch=468)
    assert (fitted.optim.name, fitted.optim.lr, fitted.optim.weight_decay) == ("sgd", 0.8, 1e-4)
    # lr 0.8 was for batch 1024: linearly scaled to the comparison's 128, as by lr_base_batch.
    assert fitted.optim.lr_base_batch == 1024 and fitted.data.batch_size == 128
    assert compare.describe_optimizer(fitted).startswith("sgd lr 0.1 ")
    assert fitted.schedule.warmup_epochs == pytest.approx(5.0 * 2 / 100)  # 5% of the run
    assert fitted.schedule.end_lr_factor == 0.01
    assert (fitted.method.label_smoothing, fitted.model.drop_path_rate) == (0.1, 0.05)
    # The comparison's: data, augmentation, budget, gradient accumulation.
    assert fitted.data.train_ops == config.data.train_ops and fitted.num_epochs == 2.0
    assert fitted.optim.grad_accum_steps == 1
    # A budget in steps: the same fraction of it.
    by_steps = compare.fit_recipe(comparison_config(total_steps=936), recipe_config(), 468)
    assert by_steps.schedule.warmup_epochs == pytest.approx(0.1)
    assert config.optim.name == "adamw"  # the comparison's config is not changed


def test_fit_recipe_keeps_a_recipe_lr_base_batch():
    recipe = recipe_config()
    recipe.optim.lr_base_batch = 256
    fitted = compare.fit_recipe(comparison_config(), recipe, steps_per_epoch=468)
    assert fitted.optim.lr_base_batch == 256
    assert compare.describe_optimizer(fitted).startswith("sgd lr 0.4 ")


def test_fit_recipe_refuses_lengths_in_steps():
    recipe = recipe_config()
    recipe.schedule.warmup_steps = 1000
    with pytest.raises(ValueError, match="lengths are in epochs"):
        compare.fit_recipe(comparison_config(), recipe, steps_per_epoch=468)


def test_recipe_of_each_family_and_an_unknown_family(monkeypatch):
    assert compare.family_of("resnet20") == "resnet"
    assert compare.family_of("swin_nano_patch2_window4_32") == "swin"
    config = comparison_config()
    fitted = compare.model_config(config, "resnet8", "recipe", steps_per_epoch=468)
    recipe = common.load_config_file(str(ROOT / compare.RECIPES["resnet"]))
    assert fitted.model.name == "resnet8" and fitted.optim.name == recipe.optim.name
    monkeypatch.setattr(compare, "RECIPES", {"resnet": compare.RECIPES["resnet"]})
    with pytest.raises(ValueError, match=r"family 'vit', which has no recipe.*knows resnet"):
        compare.model_config(config, "vit_nano_patch4_32", "recipe", steps_per_epoch=468)


def test_published_best_from_the_readme_table(tmp_path):
    (tmp_path / "README.md").write_text(
        "| Name | Examples |\n| --- | --- |\n| train | 60,000 |\n\n"
        "| Classifier | Preprocessing | Fashion test accuracy | MNIST test accuracy |\n"
        "| --- | --- | --- | --- |\n"
        "| 2 Conv | None | 0.916 | - |\n| WRN-28-10 | flips | 0.959 | 0.99 |\n"
        "| Human Performance | - | 0.835 | - |\n"
    )
    assert compare.published_best(tmp_path) == ("WRN-28-10", 0.959)
    assert compare.published_best(tmp_path / "missing") is None
