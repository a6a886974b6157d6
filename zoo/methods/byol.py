"""BYOL (Grill et al. 2020, "Bootstrap your own latent"): an online network (backbone,
projector, predictor) regresses a target network's projection of the other view; the target is
an EMA of the online backbone and projector (momentum `method.ema_momentum` -> 1 on a cosine).

    python train.py --config=configs/byol_fashion_mnist_mini.py --workdir=runs/byol

Views: SimCLR's augmentation with BYOL's asymmetric blur (p = 1.0 / 0.1, with `method.blur`)
and solarize (p = 0 / 0.2). Loss: 2 - 2 cos(p, z') for each view's prediction against the
other view's target projection, summed over both directions and averaged over the batch.
Projector and predictor: dense-BN-ReLU-dense (4096 -> 256 on a ResNet-50; the hidden width is
twice the backbone's feature width unless `method.proj_hidden_dim` is set). The target runs in
training mode (batch statistics) and keeps its own BatchNorm statistics, as in the paper.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.methods.base import (
    METHODS,
    MLP,
    Method,
    SSLNetwork,
    check_feature_task,
    cosine_increase,
    ema,
    embedding_std,
    feature_dim,
    forward_views,
    l2_normalize,
    two_views,
)


def regression_loss(p: jax.Array, z: jax.Array) -> jax.Array:
    """BYOL's normalised MSE per example: ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), in [0, 4]."""
    return jnp.sum((l2_normalize(p) - l2_normalize(z)) ** 2, axis=-1)


def byol(model: nn.Module, views, *, total_steps: int, ema_momentum: float, hidden: int, out: int):
    """BYOL on `model` (a registry model with num_classes=0) with two `views`."""
    projector = ("projector", MLP((hidden, out)))
    online = SSLNetwork(
        model, heads=(projector, ("predictor", MLP((hidden, out)))), axis_name=model.axis_name
    )
    target = SSLNetwork(model, heads=(projector,), axis_name=model.axis_name)

    def init(rng, batch):
        variables = online.init({"params": rng}, batch["image"], train=False)
        params = variables.pop("params")
        state = dict(variables)
        # The target starts as the online backbone and projector (arrays are immutable).
        parts = ("backbone", "projector")
        extra = {
            "target": {k: params[k] for k in parts},
            "target_state": {c: {k: v[k] for k in parts if k in v} for c, v in state.items()},
        }
        return params, state, extra

    def loss(params, model_state, extra, batch, rng, *, train, axis_name=None):
        # The loss has no cross-example terms; BatchNorm reads `axis_name` from the networks.
        images = [batch[view.key] for view in views]
        outputs, new_state = forward_views(
            online,
            {"params": params, **model_state},
            images,
            train=train,
            rng=rng,
            mutable=list(model_state),
        )
        targets, target_state = forward_views(
            target,
            {"params": extra["target"], **extra["target_state"]},
            images,
            train=train,
            rng=rng,
            mutable=list(extra["target_state"]),
        )
        (h1, z1, p1), (_, _, p2) = outputs
        t1, t2 = (jax.lax.stop_gradient(t[1]) for t in targets)
        per_example = regression_loss(p1, t2) + regression_loss(p2, t1)
        metrics = {
            "cosine": 1.0 - jnp.mean(per_example) / 4.0,  # online-target cosine, mean
            "embedding_std": embedding_std(z1, axis_name),
            "feature_std": embedding_std(h1, axis_name),
        }
        return jnp.mean(per_example), (metrics, new_state, {"target_state": target_state})

    def update_extra(extra, params, aux, step):
        momentum = cosine_increase(step, total_steps, ema_momentum)
        online_part = {k: params[k] for k in ("backbone", "projector")}
        return {
            "target": ema(extra["target"], online_part, momentum),
            "target_state": aux["target_state"],
        }

    def features(params, model_state, extra, images):
        return online.apply({"params": params, **model_state}, images, train=False)[0]

    return Method(
        name="byol",
        views=tuple(views),
        init=init,
        loss=loss,
        update_extra=update_extra,
        features=features,
        task="self-supervised",
    )


@METHODS.register(name="byol", metadata={"classifier": False})
def build(config: Any, model: nn.Module, spec: Any, *, total_steps: int, **_) -> Method:
    m = config.method
    check_feature_task("byol", spec, config.evals.names)
    views, size, channels = two_views(config, spec, blur=(1.0, 0.1), solarize=(0.0, 0.2))
    hidden = m.proj_hidden_dim or 2 * feature_dim(model, (size, size, channels))
    return byol(
        model,
        views,
        total_steps=total_steps,
        ema_momentum=m.ema_momentum,
        hidden=hidden,
        out=m.proj_dim or 256,
    )
