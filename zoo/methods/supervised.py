"""Supervised classification as a method: softmax cross-entropy with label smoothing.

A method is one frozen dataclass of pure functions (DESIGN.md): `init`, `loss`,
`update_extra`, `features`. The one train step calls `loss` for every method, so supervised
training is not special-cased anywhere.

    method = supervised(model, num_classes=10, label_smoothing=0.1)
    loss, (metrics, model_state) = method.loss(params, model_state, extra, batch, rng,
                                               train=True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """The functions that make a training method; every field is a pure function."""

    name: str
    views: tuple[str, ...]  # what the data pipeline produces per example
    init: Callable[..., tuple[Any, Any, Any]]  # (rng, batch) -> (params, model_state, extra)
    loss: Callable[..., tuple[jax.Array, tuple[dict, Any]]]
    update_extra: Callable[[Any, Any, jax.Array], Any]  # (extra, params, step) -> extra
    logits: Callable[..., jax.Array]  # (params, model_state, images) -> [B, classes], eval


def smoothed_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Integer labels [B] -> targets [B, K]: (1 - s) on the class, s / K spread evenly."""
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with soft targets [B, K] -> [B]."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """[B] 1.0 where the label is among the k largest logits."""
    k = min(k, logits.shape[-1])
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # Rank = number of classes with a strictly larger logit (ties count in the label's favour).
    rank = jnp.sum(logits > label_logit, axis=-1)
    return (rank < k).astype(jnp.float32)


def supervised(model: nn.Module, num_classes: int, label_smoothing: float = 0.0) -> Method:
    """Multi-class classification with softmax cross-entropy."""

    def init(rng: jax.Array, batch: Batch):
        variables = model.init({"params": rng}, batch["image"], train=False)
        params = variables.pop("params")
        return params, dict(variables), {}

    def loss(params, model_state, extra, batch: Batch, rng: jax.Array, *, train: bool):
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
        if "targets" in batch:  # soft targets from mixup/cutmix, smoothing folded in
            targets = batch["targets"]
        else:
            targets = smoothed_labels(batch["label"], num_classes, label_smoothing)
        per_example = cross_entropy(logits, targets)
        # Against the hard label (of the dominant image, when mixed).
        metrics = {"accuracy": jnp.mean(topk_correct(logits, batch["label"], 1))}
        return jnp.mean(per_example), (metrics, dict(new_state))

    def logits(params, model_state, images):
        return model.apply({"params": params, **model_state}, images, train=False)

    return Method(
        name="supervised",
        views=("image",),
        init=init,
        loss=loss,
        update_extra=lambda extra, params, step: extra,
        logits=logits,
    )
