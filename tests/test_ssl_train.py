"""End to end: each self-supervised CPU config runs from train.py, checkpoints, resumes exactly,
is evaluated by `python -m zoo.evaluate`, and fine-tunes as a classifier with init_from."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 4 steps of batch 16 at 16 px, checkpoints at 2 and 4, k-NN and a short probe at the end.
SHORT_RUN = [
    "--config.total_steps=4",
    "--config.data.batch_size=16",
    "--config.data.eval_batch_size=1000",
    "--config.method.crop_size=16",
    "--config.method.local_crop_size=8",
    "--config.checkpoint.every_steps=2",
    "--config.evals.every_steps=100",
    "--config.evals.linear_probe.steps=20",
    "--config.logging.every_steps=1",
]


def run(*command, timeout=600):
    env = {**os.environ, "XLA_FLAGS": ""}  # one device, like a user's laptop
    result = subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def checkpoint(workdir, step):
    state = ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / f"checkpoints/{step}/state")
    return {k: state[k] for k in ("params", "model_state", "extra", "opt_state")}


def flatten(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


# BYOL's run is slow-marked (the suite's time): its loop path is SimCLR's, its step is tested
# in tests/test_methods.py.
# SimCLR's config also trains in README's test and the self-supervised notebook's (CI);
# its checkpoint-and-resume run here is under -m slow, as BYOL's.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) for n in ("simclr", "byol")] + ["dino"]
)
def test_config_trains_checkpoints_and_resumes_exactly(name, tmp_path):
    config = f"--config=configs/{name}_fashion_mnist_mini.py"
    output = run("train.py", config, f"--workdir={tmp_path}", *SHORT_RUN)
    assert "final eval on 2000 images: knn_accuracy" in output, output
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["embedding_std"] > 0 for r in train)
    (final,) = [r for r in records if r["split"] == "eval"]
    assert 0.1 < final["knn_accuracy"] <= 1.0 and 0.1 < final["linear_probe_accuracy"] <= 1.0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # Resume from step 2 (as after a crash): the same step-4 state, bit for bit.
    reference = flatten(checkpoint(tmp_path, 4))
    shutil.rmtree(tmp_path / "checkpoints/4")
    output = run("train.py", config, f"--workdir={tmp_path}", *SHORT_RUN, "--config.evals.names=")
    assert "resumed at step 2" in output
    resumed = flatten(checkpoint(tmp_path, 4))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)

    if name == "simclr":  # evaluation without training, no classifier, fine-tuning
        result = subprocess.run(
            [sys.executable, "-m", "zoo.predict", f"--workdir={tmp_path}", "x.png"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 2 and "has no classifier: fine-tune it" in result.stderr
        line = run("-m", "zoo.evaluate", f"--workdir={tmp_path}", "--evals=knn")
        assert "step 4, 2000 eval images" in line and "knn_accuracy" in line
        assert f"{final['knn_accuracy']:.4f}" in line  # the same features as the run's eval
        finetune = tmp_path.parent / "finetune"
        output = run(
            "train.py", f"--workdir={finetune}", f"--config.init_from={tmp_path}",
            "--config.total_steps=1", "--config.data.batch_size=16",
            "--config.optim.lr=0",  # the parameters stay as loaded
        )  # fmt: skip
        assert "re-initialised the classifier head" in output and "accuracy" in output
        pretrained = flatten(checkpoint(tmp_path, 4)["params"]["backbone"])
        tuned = ocp.StandardCheckpointer().restore(finetune / "checkpoints/1/state")
        tuned = flatten({k: v for k, v in tuned["params"].items() if k != "fc"})
        assert tuned.keys() == pretrained.keys()
        for key, value in pretrained.items():
            np.testing.assert_array_equal(tuned[key], value, err_msg=key)


def test_evaluate_baselines_and_usage_errors(tmp_path):
    config = "--config=configs/simclr_fashion_mnist_mini.py"
    out = run("-m", "zoo.evaluate", config, "--baseline=pixels", "--evals=knn")
    assert "pixels baseline, 2000 eval images" in out and "knn_accuracy 0.8" in out
    result = subprocess.run(
        [sys.executable, "-m", "zoo.evaluate", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "config.json is missing" in result.stderr
