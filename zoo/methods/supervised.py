"""Supervised classification as a method, for the three tasks of a dataset (DatasetSpec.task).

  multiclass  softmax cross-entropy with label smoothing (Szegedy et al. 2016); `label` int32.
              Or, with `multiclass_loss="sigmoid"`, binary cross-entropy per class against
              the same one-hot targets (Wightman et al. 2021, "ResNet strikes back", timm's
              BinaryCrossEntropy): the mean over classes, optionally with the targets above
              `bce_target_threshold` set to 1 (mixed/smoothed targets binarised).
  binary      ONE logit and sigmoid binary cross-entropy; `label` int32 0/1. One logit (not a
              2-way softmax) because its sigmoid is the positive-class score that ROC-AUC,
              precision/recall and F1 are defined on, and it has no redundant parameters
              (a 2-way softmax depends only on the difference of its two logits). The model is
              built with num_classes=1 (DatasetSpec.num_classes is 1 for binary datasets).
  multilabel  K logits, independent sigmoid BCE per class; `label` uint8 multi-hot [K]

Label smoothing for the sigmoid tasks moves each 0/1 target towards 1/2: y(1 - s) + s/2.

A method is one frozen dataclass of pure functions (zoo/methods/base.py): `init`, `loss`,
`update_extra`, `features`, `logits`, and `eval_sums`, which the one eval step
(zoo/training/step.py) calls to get the task's (sum, count) statistics of a batch, so
evaluation is not forked either.

    method = supervised(model, num_classes=10, label_smoothing=0.1)           # multiclass
    method = supervised(model, num_classes=1, task="binary")
    method = supervised(model, num_classes=10, task="multilabel", threshold=0.5)
    loss, (metrics, model_state, aux) = method.loss(params, model_state, extra, batch, rng,
                                                    train=True)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.data.augment import photometric_from_config
from zoo.methods.base import METHODS, Method, View, keep_extra

Batch = dict[str, Any]
TASKS = ("multiclass", "binary", "multilabel")
MULTICLASS_LOSSES = ("softmax", "sigmoid")


def smoothed_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Integer labels [B] -> targets [B, K]: (1 - s) on the class, s / K spread evenly."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with soft targets [B, K] -> [B]."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example sigmoid BCE, averaged over the labels: logits, targets [B, K] -> [B]."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets), -1)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """[B] 1.0 where the label is among the k largest logits; 0.0 wherever a logit of the
    example is NaN or infinite (a diverged model is never right)."""
    k = min(k, logits.shape[-1])
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # Rank = number of classes with a strictly larger logit (ties count in the label's favour).
    rank = jnp.sum(logits > label_logit, axis=-1)
    return ((rank < k) & all_finite(logits)).astype(jnp.float32)


def all_finite(logits: jax.Array) -> jax.Array:
    """[B] whether every logit of each example is finite."""
    return jnp.all(jnp.isfinite(logits), axis=-1)


def is_positive(probabilities: Any, threshold: float) -> Any:
    """The decision rule of binary and multi-label outputs, in evaluation and prediction alike:
    a probability at or above `threshold` is positive. Compared in float32 (the models'
    output dtype), so both give the same answer at the boundary; numpy or JAX arrays."""
    return probabilities >= np.float32(threshold)


def predicted_labels(logits: jax.Array, truth: jax.Array, threshold: float) -> jax.Array:
    """0/1 decisions [B, K] at `threshold`; a non-finite logit gets the wrong answer
    (1 - truth), so it counts as a false positive or a false negative, never as right."""
    decided = is_positive(jax.nn.sigmoid(logits), threshold)
    return jnp.where(jnp.isfinite(logits), decided, truth < 0.5).astype(jnp.float32)


def sigmoid_targets(labels: jax.Array) -> jax.Array:
    """Binary int labels [B] or multi-hot [B, K] -> float targets [B, K'] (K' = 1 for binary)."""
    labels = labels.astype(jnp.float32)
    return labels[:, None] if labels.ndim == 1 else labels


def supervised(
    model: nn.Module,
    num_classes: int,
    label_smoothing: float = 0.0,
    task: str = "multiclass",
    threshold: float = 0.5,
    views: tuple[View, ...] = (View("image", ""),),
    multiclass_loss: str = "softmax",
    bce_target_threshold: float = 0.0,
) -> Method:
    """Classification with the loss and eval statistics of `task` (see module docstring).

    Args:
      model: a zoo model with `num_classes` outputs (1 for binary).
      num_classes: outputs of the model: classes (multiclass, multilabel) or 1 (binary).
      label_smoothing: s in [0, 1); softmax: (1 - s) one-hot + s / K; sigmoid: y(1 - s) + s/2.
      task: "multiclass", "binary" or "multilabel".
      threshold: probability at or above which a sigmoid output counts as positive (binary
        and multilabel accuracy, precision, recall, F1; `is_positive`).
      views: the data pipeline's views (one: `image`, with the config's `data.train_ops`).
      multiclass_loss: "softmax" (cross-entropy) or "sigmoid" (per-class binary
        cross-entropy on the one-hot targets); multiclass only.
      bce_target_threshold: with "sigmoid", targets above it become 1 and the rest 0 (timm's
        `target_threshold`); 0 = the targets as they are.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got '{task}'")
    if multiclass_loss not in MULTICLASS_LOSSES:
        raise ValueError(
            f"method.multiclass_loss must be one of {', '.join(MULTICLASS_LOSSES)}, got "
            f"'{multiclass_loss}'"
        )
    if multiclass_loss != "softmax" and task != "multiclass":
        raise ValueError(
            f"method.multiclass_loss='{multiclass_loss}' applies to multiclass datasets; a "
            f"{task} dataset is trained with sigmoid binary cross-entropy already: unset it"
        )
    if not 0.0 <= bce_target_threshold < 1.0:
        raise ValueError(
            f"method.bce_target_threshold must be in [0, 1) (0 = off; timm's recipes use 0.2), "
            f"got {bce_target_threshold}"
        )
    sigmoid = multiclass_loss == "sigmoid"

    def multiclass_loss_fn(logits: jax.Array, targets: jax.Array) -> jax.Array:
        """Per-example loss [B] against targets [B, K] (one-hot, smoothed or mixed)."""
        if not sigmoid:
            return cross_entropy(logits, targets)
        if bce_target_threshold > 0:
            targets = (targets > bce_target_threshold).astype(targets.dtype)
        return binary_cross_entropy(logits, targets)

    if task == "binary" and num_classes != 1:
        raise ValueError(
            f"a binary task has one logit (sigmoid), so num_classes must be 1, got {num_classes}"
        )

    def init(rng: jax.Array, batch: Batch):
        variables = model.init({"params": rng}, batch["image"], train=False)
        params = variables.pop("params")
        return params, dict(variables), {}

    def loss(params, model_state, extra, batch: Batch, rng: jax.Array, *, train: bool, **_):
        del extra
        variables = {"params": params, **model_state}
        if train:
            logits, new_state = model.apply(
                variables,
                batch["image"],
                train=True,
                rngs={"dropout": rng},
                mutable=list(model_state),
            )
        else:
            logits, new_state = model.apply(variables, batch["image"], train=False), model_state
        if task == "multiclass":
            if "targets" in batch:  # soft targets from mixup/cutmix, smoothing folded in
                targets = batch["targets"]
            else:
                targets = smoothed_labels(batch["label"], num_classes, label_smoothing)
            per_example = multiclass_loss_fn(logits, targets)
            # Against the hard label (of the dominant image, when mixed).
            accuracy = jnp.mean(topk_correct(logits, batch["label"], 1))
        else:
            hard = sigmoid_targets(batch["label"])
            per_example = binary_cross_entropy(
                logits, hard * (1.0 - label_smoothing) + label_smoothing / 2
            )
            # Per-label accuracy at the threshold (binary: the plain accuracy).
            accuracy = jnp.mean(predicted_labels(logits, hard, threshold) == hard)
        return jnp.mean(per_example), ({"accuracy": accuracy}, dict(new_state), None)

    def logits(params, model_state, images):
        return model.apply({"params": params, **model_state}, images, train=False)

    def features(params, model_state, extra, images):
        backbone = model.clone(num_classes=0)  # pooled features; the head's params go unused
        return backbone.apply({"params": params, **model_state}, images, train=False)

    def eval_sums(logits: jax.Array, batch: Batch) -> dict[str, Any]:
        labels, mask = batch["label"], batch["mask"]
        logits = logits.astype(jnp.float32)
        if task == "multiclass":
            one_hot = jax.nn.one_hot(labels, num_classes)
            finite = all_finite(logits)
            confusion = jnp.einsum(  # [true, predicted]; examples with non-finite logits left out
                "bi,bj->ij",
                one_hot * (mask * finite)[:, None],
                jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes),
            )
            return {
                "loss": jnp.sum(multiclass_loss_fn(logits, one_hot) * mask),
                "top1": jnp.sum(topk_correct(logits, labels, 1) * mask),
                "top5": jnp.sum(topk_correct(logits, labels, 5) * mask),
                "count": jnp.sum(mask),
                "nonfinite": jnp.sum(mask * ~finite),
                "confusion": confusion,
            }
        truth = sigmoid_targets(labels)  # [B, K]
        predicted = predicted_labels(logits, truth, threshold)
        finite = jnp.isfinite(logits)
        weight = mask[:, None]
        sums = {
            "loss": jnp.sum(binary_cross_entropy(logits, truth) * mask),
            "count": jnp.sum(mask),
            "nonfinite": jnp.sum(mask * ~all_finite(logits)),
            # Per class [K]: true/false positives and false negatives at the threshold.
            "tp": jnp.sum(predicted * truth * weight, axis=0),
            "fp": jnp.sum(predicted * (1 - truth) * weight, axis=0),
            "fn": jnp.sum((1 - predicted) * truth * weight, axis=0),
            "correct_labels": jnp.sum((predicted == truth) * weight),
            "exact_match": jnp.sum(jnp.all(predicted == truth, axis=-1) * mask),
            # Ranking metrics (ROC-AUC, average precision) need the scores themselves.
            # A non-finite logit's score is ranked as wrong as possible (metrics_from_totals).
            "per_example": {
                "score": jax.nn.sigmoid(logits),
                "finite": finite,
                "label": truth,
                "mask": mask,
            },
        }
        if task == "binary":  # [true, predicted] over (negative, positive)
            sums["confusion"] = jnp.einsum(
                "bi,bj->ij",
                jax.nn.one_hot(truth[:, 0], 2) * weight,
                jax.nn.one_hot(predicted[:, 0], 2),
            )
        return sums

    return Method(
        name="supervised",
        views=tuple(views),
        init=init,
        loss=loss,
        update_extra=keep_extra,
        features=features,
        logits=logits,
        eval_sums=eval_sums,
        task=task,
    )


@METHODS.register(name="supervised", metadata={"classifier": True})
def build(config: Any, model: nn.Module, spec: Any, **_) -> Method:
    """Supervised training of `config` (labels of `spec.task`), one view from `data`."""
    mixing = config.data.mixup_alpha > 0 or config.data.cutmix_alpha > 0
    if spec.task != "multiclass" and mixing:
        raise ValueError(
            f"dataset '{spec.name}' is {spec.task}; mixup/cutmix build one-hot targets and "
            "need a multiclass dataset: set data.mixup_alpha=0 and data.cutmix_alpha=0"
        )
    view = View("image", config.data.train_ops, photometric_from_config(config.data))
    return supervised(
        model,
        spec.num_classes,
        config.method.label_smoothing,
        task=spec.task,
        threshold=config.method.threshold,
        views=(view,),
        multiclass_loss=config.method.get("multiclass_loss", "softmax"),
        bce_target_threshold=config.method.get("bce_target_threshold", 0.0),
    )
