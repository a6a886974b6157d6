"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"), as google-research/simclr: two augmented views of each image, a projection
head, and the NT-Xent loss that pulls the two views of an image together against every other
view of the **global** batch.

    python train.py --config=configs/simclr_fashion_mnist_mini.py --workdir=runs/simclr

Views: random-resized crop (scale `method.crop_min_scale`-1) and flip on the host; colour
jitter at strength `method.color_jitter` (p = 0.8), grayscale (p = 0.2) and, with
`method.blur`, Gaussian blur (p = 0.5) on the device. Projection head: dense-BN-ReLU,
dense-BN-ReLU, dense-BN (SimCLR v2's 3 layers; 2048 -> 2048 -> 128 on a ResNet-50, the hidden
width is the backbone's feature width unless `method.proj_hidden_dim` is set). Both views go
through the network as one batch, so BatchNorm statistics are over 2N images of the global
batch under jit (arrays are global); under pmap `nt_xent` gathers the negatives of every device.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo import parallel
from zoo.methods.base import (
    METHODS,
    MLP,
    Method,
    SSLNetwork,
    check_feature_task,
    embedding_std,
    feature_dim,
    forward_views,
    keep_extra,
    l2_normalize,
    two_views,
)


def nt_xent(
    z1: jax.Array, z2: jax.Array, temperature: float, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array]:
    """The NT-Xent loss of two views' embeddings [n, d] (this device's rows), averaged over
    the 2n queries, each query's negatives being all other 2N - 2 views of the global batch
    (N = n x devices), and the fraction of queries whose positive scores highest.

    For query i of view 1 the logits are cos(z1_i, z_j) / T over every view j of the global
    batch but itself, and the target is z2_i (symmetrically for view 2): the mean of both
    directions, as the reference implementation (which sums them, hence twice this value).
    """
    n = z1.shape[0]
    z1, z2 = l2_normalize(z1), l2_normalize(z2)
    keys = jnp.concatenate([parallel.gather(z1, axis_name), parallel.gather(z2, axis_name)])
    total = keys.shape[0] // 2  # keys: [2N, d]
    queries = jnp.concatenate([z1, z2])  # [2n, d]
    logits = queries @ keys.T / temperature  # [2n, 2N]
    rows = parallel.example_index(n, axis_name)
    self_index = jnp.concatenate([rows, rows + total])
    positive = jnp.concatenate([rows + total, rows])
    columns = jnp.arange(2 * total)[None, :]
    logits = jnp.where(columns == self_index[:, None], -jnp.inf, logits)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, positive[:, None], axis=-1))
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == positive)
    return loss, accuracy


def simclr(model: nn.Module, views, *, temperature: float, proj_hidden_dim: int, proj_dim: int):
    """SimCLR on `model` (a registry model with num_classes=0) with two `views`."""
    projector = MLP((proj_hidden_dim, proj_hidden_dim, proj_dim), last_batch_norm=True)
    network = SSLNetwork(model, heads=(("projector", projector),), axis_name=model.axis_name)

    def init(rng, batch):
        variables = network.init({"params": rng}, batch["image"], train=False)
        params = variables.pop("params")
        return params, dict(variables), {}

    def loss(params, model_state, extra, batch, rng, *, train, axis_name=None):
        del extra
        images = [batch[view.key] for view in views]
        outputs, new_state = forward_views(
            network,
            {"params": params, **model_state},
            images,
            train=train,
            rng=rng,
            mutable=list(model_state),
        )
        (h1, z1), (h2, z2) = outputs
        value, accuracy = nt_xent(z1, z2, temperature, axis_name)
        metrics = {
            "contrastive_accuracy": accuracy,
            "embedding_std": embedding_std(z1, axis_name),  # collapse -> 0
            "feature_std": embedding_std(h1, axis_name),
        }
        return value, (metrics, new_state, None)

    def features(params, model_state, extra, images):
        return network.apply({"params": params, **model_state}, images, train=False)[0]

    return Method(
        name="simclr",
        views=tuple(views),
        init=init,
        loss=loss,
        update_extra=keep_extra,
        features=features,
        task="self-supervised",
    )


@METHODS.register(name="simclr", metadata={"classifier": False})
def build(config: Any, model: nn.Module, spec: Any, **_) -> Method:
    m = config.method
    check_feature_task("simclr", spec, config.evals.names)
    views, size, channels = two_views(config, spec, blur=(0.5, 0.5), solarize=(0.0, 0.0))
    hidden = m.proj_hidden_dim or feature_dim(model, (size, size, channels))
    return simclr(
        model,
        views,
        temperature=m.temperature,
        proj_hidden_dim=hidden,
        proj_dim=m.proj_dim or 128,
    )
