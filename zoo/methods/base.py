"""The Method contract (DESIGN.md, "Method"), the METHODS registry and what methods share.

A method is one frozen dataclass of pure functions; the one train step and the one eval step
(zoo/training/step.py) call them, so supervised classification, SimCLR, BYOL and DINO compile
into the same step:

    method = METHODS.get(config.method.name)(config, model, spec, total_steps=..., ...)
    params, model_state, extra = method.init(rng, batch)
    loss, (metrics, model_state, aux) = method.loss(params, model_state, extra, batch, rng,
                                                    train=True, axis_name=None)
    extra = method.update_extra(extra, new_params, aux, step)   # EMA teacher, DINO's centre
    features = method.features(params, model_state, extra, images)  # [B, D]: k-NN, probes

`views` says what the data pipeline makes of each training example: one `View` per batch key
(`image`, `image_1`, ...), each with its own host ops (crops, flips: zoo/data/transforms.py)
and its own device photometric ops (colour jitter, blur, solarize: zoo/data/augment.py).

Shared machinery of the self-supervised methods lives here too: the projection `MLP`, the
`SSLNetwork` (backbone + heads as one flax module) and the EMA teacher (`ema`,
`cosine_increase`), which BYOL and DINO both use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo import parallel
from zoo.registry import Registry
from zoo.training.evaluate import evaluator_names

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class View:
    """One view of a training example.

    Attributes:
      key: its batch key, `image` for the first view, then `image_1`, `image_2`, ...
      host_ops: per-image host ops (transforms.py's little language), e.g.
        "random_resized_crop(size=32, scale=(0.08, 1.0))|flip".
      photometric: keyword arguments of `augment.photometric` for this view (colour jitter
        strength and probability, grayscale, blur and solarize probabilities); empty = none.
    """

    key: str
    host_ops: str
    photometric: dict[str, float] = dataclasses.field(default_factory=dict)


def view_key(index: int) -> str:
    return "image" if index == 0 else f"image_{index}"


@dataclasses.dataclass(frozen=True)
class Method:
    """The functions that make a training method; every callable field is pure.

    Attributes:
      name: registry name.
      views: what the pipeline produces per example (see `View`).
      init: `(rng, batch) -> (params, model_state, extra)`.
      loss: `(params, model_state, extra, batch, rng, *, train, axis_name) -> (loss,
        (metrics, new_model_state, aux))`; `aux` is what `update_extra` needs.
      update_extra: `(extra, new_params, aux, step) -> extra` (state not trained by gradients).
      features: `(params, model_state, extra, images) -> [B, D]` float32 backbone features
        (`extra` for methods evaluated on their EMA teacher, as DINO).
      logits: `(params, model_state, images) -> [B, K]`, for classifiers only (else None).
      eval_sums: `(logits, batch) -> {name: sum}`, for classifiers only (else None).
      task: the dataset task the method trains on ("multiclass", "binary", "multilabel"), or
        "self-supervised" for methods that ignore labels.
    """

    name: str
    views: tuple[View, ...]
    init: Callable[..., tuple[Any, Any, Any]]
    loss: Callable[..., tuple[jax.Array, tuple[dict, Any, Any]]]
    update_extra: Callable[[Any, Any, Any, jax.Array], Any]
    features: Callable[..., jax.Array]
    logits: Callable[..., jax.Array] | None = None
    eval_sums: Callable[[jax.Array, Batch], dict[str, Any]] | None = None
    task: str = "multiclass"

    @property
    def is_classifier(self) -> bool:
        return self.logits is not None


def keep_extra(extra: Any, params: Any, aux: Any, step: jax.Array) -> Any:
    """`update_extra` of methods without extra state."""
    del params, aux, step
    return extra


# A builder: (config, model, spec, *, steps_per_epoch, total_steps) -> Method, where `model` is
# the registry model (num_classes = spec.num_classes for classifiers, 0 for feature learners).
METHODS: Registry[Callable[..., Method]] = Registry("method")


# ----------------------------------------------------------------------------- shared pieces


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def embedding_std(x: jax.Array, axis_name: str | None = None) -> jax.Array:
    """Collapse monitor: mean over dimensions of the global batch's std of L2-normalised
    embeddings, times sqrt(D). Near 1 for embeddings spread over the sphere, 0 when all are
    equal. Under pmap the moments are over every device's rows (`zoo.parallel.batch_mean`)."""
    z = l2_normalize(x)
    mean = parallel.batch_mean(z, axis_name)
    std = jnp.sqrt(parallel.batch_mean(jnp.square(z - mean), axis_name))
    return jnp.mean(std) * math.sqrt(z.shape[-1])


def cosine_increase(step: jax.Array, total_steps: int, start: float, end: float = 1.0):
    """start -> end along half a cosine over `total_steps` (BYOL's and DINO's EMA momentum,
    DINO's weight decay): end - (end - start) * (cos(pi t / T) + 1) / 2."""
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return end - (end - start) * (jnp.cos(jnp.pi * t) + 1.0) / 2.0


def ema(target: Any, online: Any, momentum: jax.Array) -> Any:
    """momentum * target + (1 - momentum) * online, leaf by leaf (the EMA teacher)."""
    return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)


class MLP(nn.Module):
    """Dense layers [hidden..., out], each hidden one followed by an optional BatchNorm and an
    activation (SimCLR's and BYOL's projector and predictor, DINO's head before its last layer).

    Attributes:
      features: widths of the layers, the last one the output.
      batch_norm: BatchNorm after each hidden layer.
      last_batch_norm: BatchNorm (without scale) after the output layer, as SimCLR's projector.
      activation: "relu" or "gelu".
      axis_name: the `pmap` axis the batch is split over, for BatchNorm statistics over the
        global batch; None under `jit`, where arrays are global already.
    """

    features: Sequence[int]
    batch_norm: bool = True
    last_batch_norm: bool = False
    activation: str = "relu"
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        act = {"relu": nn.relu, "gelu": lambda v: nn.gelu(v, approximate=False)}[self.activation]
        norm = lambda name, **kw: nn.BatchNorm(  # noqa: E731
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            axis_name=self.axis_name,
            name=name,
            **kw,
        )
        for i, width in enumerate(self.features):
            last = i == len(self.features) - 1
            x = nn.Dense(width, use_bias=not (last and self.last_batch_norm), name=f"dense_{i}")(x)
            if not last:
                x = norm(f"bn_{i}")(x) if self.batch_norm else x
                x = act(x)
            elif self.last_batch_norm:
                x = norm(f"bn_{i}", use_scale=False)(x)
        return x


class SSLNetwork(nn.Module):
    """The registry backbone (num_classes=0: pooled features [B, D]) followed by heads.

    Params are {"backbone": ..., "<head name>": ...}, so a fine-tuning run takes the backbone's
    subtree (`zoo.training.loop.load_init_from`). `__call__` returns the backbone features and
    each head's output in order, the heads applied one after another (BYOL's predictor on the
    projector's output).

    `axis_name`, when set, is the `pmap` axis the batch is split over, and the backbone and
    every head are run with it (BatchNorm statistics and dropout masks over the global batch;
    each needs an `axis_name` field, as the registry models, `MLP` and `DINOHead` have). None
    leaves them as they were built (under `jit` arrays are global already).
    """

    encoder: nn.Module
    heads: Sequence[tuple[str, nn.Module]] = ()
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, ...]:
        overrides = {} if self.axis_name is None else {"axis_name": self.axis_name}
        # Clones with explicit names: {"backbone", <head names>} whatever the field names.
        backbone = self.encoder.clone(parent=self, name="backbone", **overrides)
        features = backbone(x, train=train).astype(jnp.float32)
        outputs, h = [features], features
        for name, head in self.heads:
            h = head.clone(parent=self, name=name, **overrides)(h, train=train)
            outputs.append(h)
        return tuple(outputs)


def feature_dim(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """The width D of `model`'s pooled features (model built with num_classes=0)."""
    shape = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False
        )[0]
    )
    return int(shape.shape[-1])


def forward_views(network, variables, images: Sequence[jax.Array], *, train: bool, rng, mutable):
    """Applies `network` to views grouped by size: same-size views are concatenated along the
    batch and run as one call (one BatchNorm batch, as SimCLR's and DINO's multi-crop
    implementations). Returns (per-view outputs as tuples, updated collections)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape[1:], []).append(i)
    per_view: list[Any] = [None] * len(images)
    state = {k: v for k, v in variables.items() if k != "params"}
    for group, indices in enumerate(groups.values()):
        x = jnp.concatenate([images[i] for i in indices], axis=0)
        if train:
            out, new = network.apply(
                {"params": variables["params"], **state},
                x,
                train=True,
                rngs={"dropout": jax.random.fold_in(rng, group)},
                mutable=mutable,
            )
            state = {**state, **new}
        else:
            out = network.apply({"params": variables["params"], **state}, x, train=False)
        for j, i in enumerate(indices):
            per_view[i] = tuple(jnp.split(o, len(indices), axis=0)[j] for o in out)
    return per_view, state


def crop_size(config: Any, spec: Any) -> int:
    """`method.crop_size`, or the dataset's image side when it is 0."""
    size = config.method.crop_size or (spec.image_shape[0] if spec.image_shape else 0)
    if size <= 0:
        raise ValueError(
            f"dataset '{spec.name}' has images of varying size: set method.crop_size "
            "(the side of the random-resized crops a self-supervised method trains on)"
        )
    return int(size)


def crop_view(
    index: int,
    size: int,
    scale: tuple[float, float],
    *,
    color_jitter: float,
    blur_prob: float,
    solarize_prob: float,
    interpolation: str = "bilinear",
) -> View:
    """A view of the SimCLR/BYOL/DINO family: random-resized crop and flip on the host;
    colour jitter (p = 0.8), grayscale (p = 0.2), blur and solarize on the device."""
    return View(
        view_key(index),
        f"random_resized_crop(size={size}, scale=({scale[0]}, {scale[1]}), "
        f"interpolation='{interpolation}')|flip",
        dict(
            color_jitter_strength=color_jitter,
            color_jitter_prob=0.8,
            grayscale_prob=0.2 if color_jitter > 0 else 0.0,
            blur_prob=blur_prob,
            solarize_prob=solarize_prob,
        ),
    )


def two_views(config: Any, spec: Any, blur: tuple[float, float], solarize: tuple[float, float]):
    """SimCLR's and BYOL's two views: crops of `method.crop_size` covering
    `method.crop_min_scale`-1 of the image, with per-view blur (when `method.blur`) and
    solarize probabilities. Returns (views, crop size, image channels)."""
    m, size = config.method, crop_size(config, spec)
    views = tuple(
        crop_view(
            i,
            size,
            (m.crop_min_scale, 1.0),
            color_jitter=m.color_jitter,
            blur_prob=blur[i] if m.blur else 0.0,
            solarize_prob=solarize[i],
        )
        for i in range(2)
    )
    return views, size, spec.image_shape[2] if spec.image_shape else 3


def check_feature_task(name: str, spec: Any, evals: str) -> None:
    """A self-supervised method trains without labels and is evaluated by k-NN and linear
    probes, which need one class per image; errors name the problem and the fix."""
    names = evaluator_names(evals)
    if "classification" in names:
        raise ValueError(
            f"method '{name}' learns features and has no classifier to evaluate: set "
            "evals.names to knn and/or linear_probe (e.g. --config.evals.names=knn,linear_probe)"
        )
    if spec.task == "multilabel" and names:
        raise ValueError(
            f"method '{name}' is evaluated by {', '.join(names)}, which need one class per "
            f"image, but dataset '{spec.name}' is multilabel: pick a multiclass or binary "
            "dataset, or set evals.names='' to pretrain without evaluation"
        )
