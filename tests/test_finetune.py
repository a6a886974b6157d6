"""Fine-tuning: `init_from` a zoo workdir trained on the 10-class embedded set onto the binary
footwear task re-initialises the head, beats training from scratch with the same budget, and
`optim.freeze_backbone` (a linear probe) leaves every backbone parameter as it was."""

import pathlib
import runpy

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
from zoo.training import loop

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
