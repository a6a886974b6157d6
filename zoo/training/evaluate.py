"""Evaluators: run the eval step over a split and reduce (sum, count) pairs to metrics.

The eval step returns sums over each batch (`Method.eval_sums`), which add up exactly over
batches and devices; metrics are ratios of the totals, never means of per-batch means.
Ranking metrics (ROC-AUC, average precision) are not sums: the step also returns the
per-example scores and labels, which are collected on the host (eval sets are small) and
ranked here in numpy. By task:

  multiclass  accuracy (top-1), top5, loss, count, confusion [true, predicted]
  binary      accuracy, precision, recall, f1, auc, loss, count, confusion 2x2
  multilabel  accuracy (per label), exact_match, map (mean over classes of AP), f1_micro,
              f1_macro, loss, count

    results = evaluate(eval_step, state, batches, parallel, task="binary")

Feature evaluators (`evaluate_features`) judge a backbone without its classifier, as
self-supervised methods are judged: the features of the training split (eval ops, no
augmentation) and of the eval split, then a k-NN classifier (DINO's weighted k-NN) and a
linear probe trained on them (zoo/training/feature_eval.py): `knn_accuracy`,
`linear_probe_accuracy`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from zoo.registry import Registry
from zoo.training import feature_eval
from zoo.training.step import all_processes

EVALUATORS: Registry[str] = Registry("evaluator")
for _name, _what in (
    ("classification", "a classifier's metrics of its task on the eval split"),
    ("knn", "weighted k-NN on the backbone's features (DINO)"),
    ("linear_probe", "a linear classifier trained on the backbone's frozen features"),
):
    EVALUATORS.register(_what, name=_name)


def evaluator_names(names: str) -> list[str]:
    """'knn, linear_probe' -> ['knn', 'linear_probe']; an unknown name is an error with the
    close matches (the config's `evals.names`)."""
    parsed = [n.strip() for n in names.split(",") if n.strip()]
    for name in parsed:
        EVALUATORS.get(name)
    return parsed


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of scores [N] for 0/1 labels [N]: the probability that a
    random positive scores above a random negative (ties count 1/2), by the Mann-Whitney rank
    formula with average ranks for ties. NaN when one class is absent."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average 1-based rank over each run of tied scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of scores [N] for 0/1 labels [N]: sum over score thresholds of
    (recall step) x precision, tied scores taken together (scikit-learn's definition).
    NaN when there is no positive."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    num_pos = int(labels.sum())
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.flatnonzero(np.diff(scores) != 0).tolist() + [len(scores) - 1]
    true_positives = np.cumsum(labels)[last_of_tie]
    predicted = np.asarray(last_of_tie) + 1
    precision = true_positives / predicted
    recall_steps = np.diff(np.concatenate([[0], true_positives])) / num_pos
    return float(np.sum(recall_steps * precision))


def ranking_scores(per_example: dict[str, np.ndarray]) -> np.ndarray:
    """The eval step's per-example sigmoid scores for ROC-AUC/AP, where a non-finite logit
    ranks as wrong as possible: a positive's lowest (-1), a negative's highest (2)."""
    worst = np.where(per_example["label"] > 0.5, -1.0, 2.0)
    return np.where(per_example["finite"], per_example["score"], worst)


def f1_score(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2 tp / (2 tp + fp + fn) from counts (0 where there is nothing to find or find)."""
    tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 0.0)


def metrics_from_totals(
    totals: dict[str, Any], scores: np.ndarray | None, labels: np.ndarray | None, task: str
) -> dict[str, Any]:
    """The metrics of `task` from summed eval statistics and the collected scores/labels."""
    count = max(float(totals["count"]), 1.0)
    results: dict[str, Any] = {
        "loss": float(totals["loss"]) / count,
        "count": int(round(float(totals["count"]))),
        # Examples with a NaN or infinite logit: counted wrong by every metric.
        "nonfinite": int(round(float(totals.get("nonfinite", 0)))),
    }
    if "confusion" in totals:
        results["confusion"] = np.asarray(totals["confusion"]).round().astype(np.int64)
    if task == "multiclass":
        results["accuracy"] = float(totals["top1"]) / count
        results["top5"] = float(totals["top5"]) / count
        return results
    tp, fp, fn = (np.asarray(totals[k], np.float64) for k in ("tp", "fp", "fn"))
    num_labels = tp.shape[-1]
    results["accuracy"] = float(totals["correct_labels"]) / (count * num_labels)
    if task == "binary":
        results["precision"] = _ratio(tp[0], tp[0] + fp[0])
        results["recall"] = _ratio(tp[0], tp[0] + fn[0])
        results["f1"] = float(f1_score(tp, fp, fn)[0])
        results["auc"] = roc_auc(scores[:, 0], labels[:, 0])
        return results
    results["exact_match"] = float(totals["exact_match"]) / count
    # Classes without a positive in the eval set have no AP; mAP averages over the others.
    ap = [average_precision(scores[:, k], labels[:, k]) for k in range(num_labels)]
    results["map"] = float(np.nanmean(ap)) if not np.all(np.isnan(ap)) else float("nan")
    results["f1_micro"] = float(f1_score(tp.sum(), fp.sum(), fn.sum()))
    results["f1_macro"] = float(np.mean(f1_score(tp, fp, fn)))
    return results


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else 0.0


def evaluate(
    eval_step: Callable,
    state: Any,
    batches: Iterable[dict[str, np.ndarray]],
    parallel,
    task: str = "multiclass",
) -> dict[str, Any]:
    """Runs `eval_step` over `batches` and returns the metrics of `task` (module docstring).

    `parallel` (zoo.training.step.Parallel) lays each batch out for the step; batches whose
    size does not divide over the devices are padded with masked examples first."""
    totals, scores, labels = None, [], []
    for batch in batches:
        batch = pad_to_devices(batch, parallel)
        sums = dict(eval_step(state, parallel.put_batch(batch)))
        per_example = sums.pop("per_example", None)
        if per_example is not None:  # one host copy per batch: only for ranking metrics
            per_example = jax.tree.map(parallel.rows, per_example)
            keep = per_example["mask"] > 0
            per_example = {k: v[keep] for k, v in per_example.items()}
            scores.append(ranking_scores(per_example))
            labels.append(per_example["label"])
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    if totals is None:
        raise ValueError("the eval split is empty")
    totals = parallel.host(totals)  # one host sync per evaluation
    scores = np.concatenate(scores) if scores else None
    labels = np.concatenate(labels) if labels else None
    return metrics_from_totals(totals, scores, labels, task)


def pad_to_devices(batch: dict[str, np.ndarray], parallel) -> dict[str, np.ndarray]:
    """A masked eval batch padded with masked examples to a multiple of this process's
    devices (an eval batch of 500 on 8 devices: 504), so any batch size evaluates anywhere."""
    from zoo.data.pipeline import pad_batch

    devices = len(parallel.mesh.local_devices)
    size = len(batch["mask"])
    if size % devices == 0:
        return batch
    padded = pad_batch(batch, -(-size // devices) * devices)
    padded["mask"][:size] = batch["mask"]  # keep the masked rows of the batch masked
    return padded


def collect_features(
    features_step: Callable, state: Any, batches: Iterable[dict[str, np.ndarray]], parallel
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D] float32, labels [N]) of every real (unmasked) example of `batches`."""
    features, labels = [], []
    for batch in batches:
        batch = pad_to_devices(batch, parallel)
        out = parallel.rows(features_step(state, parallel.put_batch(batch)))
        mask, label = all_processes((batch["mask"], np.asarray(batch["label"])))
        keep = mask > 0
        features.append(out[keep].astype(np.float32))
        labels.append(label[keep])
    if not features:
        raise ValueError("the split to compute features of is empty")
    return np.concatenate(features), np.concatenate(labels)


def evaluate_features(
    features_step: Callable,
    state: Any,
    train_batches: Iterable[dict[str, np.ndarray]],
    eval_batches: Iterable[dict[str, np.ndarray]],
    parallel,
    *,
    names: list[str],
    num_classes: int,
    knn: Any,
    linear_probe: Any,
) -> dict[str, Any]:
    """The feature evaluators in `names` ("knn", "linear_probe") of the state's backbone.

    Args:
      features_step: the compiled eval step with `output="features"`.
      train_batches, eval_batches: the training and eval splits with the eval ops and masks.
      num_classes: classes of the labels (2 for a binary task's 0/1 labels).
      knn, linear_probe: the config's `evals.knn` ({k, temperature}) and
        `evals.linear_probe` ({steps, lr, weight_decay}).

    Returns:
      {"knn_accuracy", "linear_probe_accuracy", "linear_probe_train_accuracy", "count"}, the
      ones asked for (count: eval examples).
    """
    train_x, train_y = collect_features(features_step, state, train_batches, parallel)
    eval_x, eval_y = collect_features(features_step, state, eval_batches, parallel)
    if not (np.all(np.isfinite(train_x)) and np.all(np.isfinite(eval_x))):
        raise ValueError("the backbone's features are not finite (NaN or inf): the run diverged")
    results: dict[str, Any] = {"count": int(len(eval_y))}
    if "knn" in names:
        results["knn_accuracy"] = feature_eval.knn_accuracy(
            train_x,
            train_y,
            eval_x,
            eval_y,
            num_classes=num_classes,
            k=knn.k,
            temperature=knn.temperature,
        )
    if "linear_probe" in names:
        probe = feature_eval.linear_probe(
            train_x,
            train_y,
            eval_x,
            eval_y,
            num_classes=num_classes,
            steps=linear_probe.steps,
            learning_rate=linear_probe.lr,
            weight_decay=linear_probe.weight_decay,
        )
        results["linear_probe_accuracy"] = float(probe["accuracy"])
        results["linear_probe_train_accuracy"] = float(probe["train_accuracy"])
    return results


def run_evaluators(
    names: list[str],
    state: Any,
    *,
    spec: Any,
    config: Any,
    eval_step: Callable,
    features_step: Callable,
    parallel,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, Any]:
    """The evaluators `names` (the config's `evals.names`) of `state`, as one dict of metrics.

    `eval_step` and `features_step` are the compiled eval step with `output="sums"` and
    `output="features"` compiled by `parallel` (zoo.training.step.Parallel); the splits come
    from `config.data` (zoo/data/pipeline.py). A state with an EMA of the weights
    (`optim.ema_decay`) is evaluated a second time with the averaged weights, whose scalar
    metrics are added with the prefix `ema_` (e.g. `ema_accuracy`).
    """
    kwargs = dict(
        spec=spec,
        config=config,
        eval_step=eval_step,
        features_step=features_step,
        parallel=parallel,
        process_index=process_index,
        process_count=process_count,
    )
    results = _run_evaluators(names, state, **kwargs)
    if getattr(state, "ema", None) is not None:
        # The same tree structure (the EMA stays in it): the compiled steps are reused.
        averaged = state.replace(params=state.ema["params"], model_state=state.ema["model_state"])
        ema_results = _run_evaluators(names, averaged, **kwargs)
        results.update(
            {f"ema_{k}": v for k, v in ema_results.items() if k != "count" and np.ndim(v) == 0}
        )
    return results


def _run_evaluators(
    names: list[str],
    state: Any,
    *,
    spec: Any,
    config: Any,
    eval_step: Callable,
    features_step: Callable,
    parallel,
    process_index: int,
    process_count: int,
) -> dict[str, Any]:
    from zoo.data import pipeline

    process = dict(process_index=process_index, process_count=process_count)
    results: dict[str, Any] = {}
    if "classification" in names:
        batches = pipeline.eval_batches(spec, config.data, **process)
        results = evaluate(eval_step, state, batches, parallel, task=spec.task)
    feature_names = [name for name in names if name != "classification"]
    if feature_names:
        results.update(
            evaluate_features(
                features_step,
                state,
                pipeline.eval_batches(spec, config.data, role="train", **process),
                pipeline.eval_batches(spec, config.data, **process),
                parallel,
                names=feature_names,
                num_classes=max(spec.num_classes, 2),  # binary: 0/1 labels
                knn=config.evals.knn,
                linear_probe=config.evals.linear_probe,
            )
        )
    return results
