"""Binary and multi-label classification: the eval metrics equal an independent numpy
reference on the same scores, sum exactly over batches and 8 devices, and the binary and
multi-label configs train through the loop on their real (embedded) data."""

import dataclasses
import json
import pathlib
import runpy

import flax.linen
import jax
import numpy as np
import pytest

from zoo.data import pipeline
from zoo.data.datasets import get_dataset
from zoo.methods.supervised import supervised
from zoo.models import create_model
from zoo.training import evaluate as evaluate_lib
from zoo.training import loop
from zoo.training import step as step_lib
from zoo.training.state import TrainState

ROOT = pathlib.Path(__file__).resolve().parents[1]

# 203 examples: the last batch is padded; batches of 12 are padded again to 16 on 8 devices.
NUM, CLASSES, BATCH = 203, 5, 12


def reference_auc(scores, labels):
    """P(score of a positive > score of a negative), ties 1/2, over every pair."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return greater / (len(pos) * len(neg))


def reference_ap(scores, labels):
    """Mean over positives of the precision among examples scoring at least as high."""
    precisions = [
        labels[scores >= s].sum() / (scores >= s).sum() for s in scores[labels == 1]
    ]  # fmt: skip
    return np.mean(precisions)


def reference_f1(predicted, truth):
    tp = np.sum(predicted & truth)
    fp, fn = np.sum(predicted & ~truth), np.sum(~predicted & truth)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def logits_and_labels(task, seed=0):
    """Logits rounded to 0.25 (so that scores tie) that agree with the labels more than not."""
    rng = np.random.default_rng(seed)
    k = 1 if task == "binary" else CLASSES
    labels = (rng.random((NUM, k)) < 0.35).astype(np.float32)
    logits = np.round((rng.normal(size=(NUM, k)) + 1.5 * (labels - 0.35)) * 4) / 4
    labels = labels[:, 0].astype(np.int32) if task == "binary" else labels.astype(np.uint8)
    return logits.astype(np.float32), labels


def evaluate_logits(task, logits, labels, devices, mode="jit"):
    """The eval step and `evaluate` over fixed logits (the 'model' returns its input)."""
    num_classes = 1 if task == "binary" else CLASSES
    method = supervised(create_model("resnet8", num_classes=num_classes), num_classes, task=task)
    method = dataclasses.replace(method, logits=lambda params, state, images: images)
    parallel = step_lib.Parallel(step_lib.make_mesh(devices), mode)
    eval_step = parallel.compile_eval_step(method=method, augment=lambda b, rng: b)
    state = TrainState(step=0, params={}, model_state={}, opt_state=(), extra={})
    batches = []
    for start in range(0, NUM, BATCH):
        chunk = {"image": logits[start : start + BATCH], "label": labels[start : start + BATCH]}
        batches.append(pipeline.pad_batch(chunk, BATCH))
    state = parallel.put_state(jax.device_put(state, step_lib.shardings(parallel.mesh)[0]))
    return evaluate_lib.evaluate(eval_step, state, batches, parallel, task=task)


def assert_same_results(results, devices, mode, task, logits, labels):
    """Another device count or mode gives the same metrics: counts, confusion matrix and
    ranking metrics exactly, the summed loss to float32 round-off."""
    other = evaluate_logits(task, logits, labels, devices, mode)
    assert set(other) == set(results)
    for key, value in results.items():
        if key == "loss":
            np.testing.assert_allclose(other[key], value, rtol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(other[key], value, err_msg=f"{mode}: {key}")


def test_binary_metrics_match_numpy_and_eight_devices_equal_one():
    logits, labels = logits_and_labels("binary")
    results = evaluate_logits("binary", logits, labels, jax.devices()[:1])
    scores, truth = 1 / (1 + np.exp(-logits[:, 0])), labels == 1
    predicted = scores >= 0.5  # at or above the threshold (is_positive)
    tp, fp, fn = np.sum(predicted & truth), np.sum(predicted & ~truth), np.sum(~predicted & truth)
    assert results["count"] == NUM
    assert results["accuracy"] == pytest.approx(np.mean(predicted == truth))
    assert results["precision"] == pytest.approx(tp / (tp + fp))
    assert results["recall"] == pytest.approx(tp / (tp + fn))
    assert results["f1"] == pytest.approx(reference_f1(predicted, truth))
    assert results["auc"] == pytest.approx(reference_auc(scores, labels), abs=1e-6)
    bce = np.mean(
        np.maximum(logits[:, 0], 0)
        - logits[:, 0] * labels
        + np.log1p(np.exp(-np.abs(logits[:, 0])))
    )
    assert results["loss"] == pytest.approx(bce, rel=1e-5)
    want_confusion = [[np.sum(~predicted & ~truth), fp], [fn, tp]]
    np.testing.assert_array_equal(results["confusion"], want_confusion)

    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    for mode in ("jit", "pmap"):
        assert_same_results(results, jax.devices(), mode, "binary", logits, labels)


def test_multilabel_metrics_match_numpy_and_eight_devices_equal_one():
    logits, labels = logits_and_labels("multilabel")
    results = evaluate_logits("multilabel", logits, labels, jax.devices()[:1])
    scores, truth = 1 / (1 + np.exp(-logits)), labels == 1
    predicted = scores >= 0.5  # at or above the threshold (is_positive)
    aps = [reference_ap(scores[:, k], labels[:, k]) for k in range(CLASSES)]
    assert results["map"] == pytest.approx(np.mean(aps), abs=1e-6)
    assert results["f1_micro"] == pytest.approx(reference_f1(predicted, truth))
    macro = np.mean([reference_f1(predicted[:, k], truth[:, k]) for k in range(CLASSES)])
    assert results["f1_macro"] == pytest.approx(macro)
    assert results["accuracy"] == pytest.approx(np.mean(predicted == truth))
    assert results["exact_match"] == pytest.approx(np.mean(np.all(predicted == truth, axis=1)))
    assert "confusion" not in results

    for mode in ("jit", "pmap"):
        assert_same_results(results, jax.devices(), mode, "multilabel", logits, labels)


def test_multiclass_metrics_match_numpy_and_pmap_equals_jit():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, CLASSES, NUM).astype(np.int32)
    logits = (rng.normal(size=(NUM, CLASSES)) + 2 * np.eye(CLASSES)[labels]).astype(np.float32)
    results = evaluate_logits("multiclass", logits, labels, jax.devices()[:1])
    predicted = logits.argmax(1)
    assert results["accuracy"] == pytest.approx(np.mean(predicted == labels))
    want = np.zeros((CLASSES, CLASSES), np.int64)
    np.add.at(want, (labels, predicted), 1)
    np.testing.assert_array_equal(results["confusion"], want)
    for mode in ("jit", "pmap"):
        assert_same_results(results, jax.devices(), mode, "multiclass", logits, labels)


def test_ranking_metrics_on_hand_computed_cases():
    # Scores 0.9(+) 0.8(-) 0.7(+) 0.7(-) 0.1(-): the pairs won are 3 + (0 + 0.5 + 1) of 6.
    scores, labels = np.array([0.9, 0.8, 0.7, 0.7, 0.1]), np.array([1, 0, 1, 0, 0])
    assert evaluate_lib.roc_auc(scores, labels) == pytest.approx(4.5 / 6)
    # AP: precision 1/1 at the first positive, 2/4 at the tie holding the second.
    assert evaluate_lib.average_precision(scores, labels) == pytest.approx((1 + 0.5) / 2)
    assert np.isnan(evaluate_lib.roc_auc(scores, np.zeros(5)))
    assert np.isnan(evaluate_lib.average_precision(scores, np.zeros(5)))


@pytest.mark.parametrize(
    "config_file, task, keys",
    [
        ("binary_footwear", "binary", ("accuracy", "precision", "recall", "f1", "auc")),
        ("multilabel_mosaic", "multilabel", ("accuracy", "map", "f1_micro", "f1_macro")),
    ],
)
def test_config_trains_a_few_steps_and_writes_task_metrics(tmp_path, config_file, task, keys):
    config = runpy.run_path(str(ROOT / f"configs/{config_file}.py"))["get_config"]()
    assert get_dataset(config.data.name).task == task
    config.total_steps = 4
    config.data.batch_size = 16
    config.data.eval_batch_size = 400  # divisible by the 8 test devices
    config.logging.every_steps = 2
    config.evals.every_steps = 4
    results = loop.run(config, tmp_path)
    assert results["count"] == 2000
    for key in keys:
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and set(keys) <= set(evals[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 4 and all(f"eval_{key}" in summary for key in keys)
    assert (tmp_path / "confusion_matrix.png").exists() == (task == "binary")


def test_mixup_on_a_multilabel_dataset_names_the_fix():
    config = runpy.run_path(str(ROOT / "configs/multilabel_mosaic.py"))["get_config"]()
    config.data.mixup_alpha = 0.8
    spec = get_dataset(config.data.name)
    with pytest.raises(ValueError, match="mixup_alpha=0"):
        loop.build_method(config, create_model("resnet8", num_classes=10), spec)
    with pytest.raises(ValueError, match="num_classes must be 1"):
        supervised(create_model("resnet8", num_classes=2), 2, task="binary")


class Linear(flax.linen.Module):
    """logits = flattened image @ W + b: a model whose logits the test computes itself."""

    num_classes: int

    @flax.linen.compact
    def __call__(self, x, *, train):
        del train
        return flax.linen.Dense(self.num_classes)(x.reshape(len(x), -1))


def reference_bce(logits, targets):
    """Mean over classes and examples of the numerically stable sigmoid cross-entropy."""
    per_label = np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
    return per_label.mean()


@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_multiclass_sigmoid_loss_equals_numpy_bce_on_smoothed_and_mixed_targets(threshold):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 8).astype(np.int32)
    method = supervised(
        Linear(CLASSES),
        CLASSES,
        label_smoothing=0.1,
        multiclass_loss="sigmoid",
        bce_target_threshold=threshold,
    )
    params, model_state, extra = method.init(jax.random.PRNGKey(0), {"image": images})
    kernel, bias = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])
    logits = images.reshape(8, -1) @ kernel + bias
    smoothed = np.eye(CLASSES)[labels] * 0.9 + 0.1 / CLASSES
    mixed = 0.7 * smoothed + 0.3 * smoothed[::-1]  # soft targets as mixup makes them
    for batch, targets in (
        ({"image": images, "label": labels}, smoothed),
        ({"image": images, "label": labels, "targets": mixed}, mixed),
    ):
        if threshold:
            targets = (targets > threshold).astype(np.float64)
        loss, _ = method.loss(params, model_state, extra, batch, None, train=False)
        np.testing.assert_allclose(float(loss), reference_bce(logits, targets), rtol=1e-5)
    # Evaluation: the loss against the one-hot label, accuracy by the largest logit as ever.
    sums = method.eval_sums(jax.numpy.asarray(logits), {"label": labels, "mask": np.ones(8)})
    np.testing.assert_allclose(
        float(sums["loss"]) / 8, reference_bce(logits, np.eye(CLASSES)[labels]), rtol=1e-5
    )
    assert float(sums["top1"]) == np.sum(logits.argmax(-1) == labels)


def test_sigmoid_multiclass_loss_errors_name_the_fix():
    with pytest.raises(ValueError, match="multiclass_loss must be one of softmax, sigmoid"):
        supervised(Linear(CLASSES), CLASSES, multiclass_loss="bce")
    with pytest.raises(ValueError, match="applies to multiclass datasets"):
        supervised(Linear(1), 1, task="binary", multiclass_loss="sigmoid")
