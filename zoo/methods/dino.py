"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"), as
facebookresearch/dino: a student matches, over multi-crop views, the centred and sharpened
output of a teacher that is an EMA of the student (self-distillation with no labels).

    python train.py --config=configs/dino_fashion_mnist_mini.py --workdir=runs/dino

Views: 2 global crops (scale `method.crop_min_scale`-1, e.g. 0.4-1, at `method.crop_size`)
and `method.num_local_crops` local crops (scale `method.local_crop_min_scale`-
`method.crop_min_scale`, at `method.local_crop_size`), bicubic, flipped; colour jitter
(p = 0.8), grayscale (p = 0.2); blur p = 1.0 / 0.1 on the global views and 0.5 on the local
ones (with `method.blur`), solarize p = 0.2 on the second global view. The teacher sees the
global views only, the student all of them; same-size views run as one batch.

Head: 3-layer MLP (GELU) to a `method.proj_dim` bottleneck, L2-normalised, then a
weight-normalised linear layer (its norm fixed at 1) to `method.out_dim` outputs K. Loss: the
mean over (teacher global view, other student view) pairs of the cross-entropy between
softmax((t - centre) / teacher_temp) and softmax(s / student_temp). The centre is an EMA
(`method.center_momentum`) of the teacher's batch mean over the global batch; the teacher
temperature warms up linearly from `method.teacher_temp_start` to `method.teacher_temp` over
`method.teacher_temp_warmup_epochs`; the teacher momentum follows a cosine from
`method.ema_momentum` to 1; the last layer is frozen (no gradient) for
`method.freeze_last_layer_epochs`. The weight-decay cosine 0.04 -> 0.4 is the optimizer's
(`optim.weight_decay`, `optim.weight_decay_end`). k-NN and linear probes use the teacher's
backbone features, as the paper's evaluations.
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
    cosine_increase,
    crop_size,
    crop_view,
    ema,
    embedding_std,
    forward_views,
    l2_normalize,
)


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised linear layer without bias (K outputs).
    `axis_name`: the `pmap` axis of the batch, for the MLP's BatchNorm statistics."""

    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    batch_norm: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        features = (self.hidden_dim, self.hidden_dim, self.bottleneck_dim)
        mlp = MLP(
            features,
            batch_norm=self.batch_norm,
            activation="gelu",
            axis_name=self.axis_name,
            name="mlp",
        )
        x = mlp(x, train=train)
        x = l2_normalize(x)
        shape = (self.bottleneck_dim, self.out_dim)  # the weight is v / ||v|| per output
        v = self.param("last_layer", nn.initializers.truncated_normal(0.02), shape)
        return x @ l2_normalize(v.T).T


def dino_loss(
    student: list[jax.Array],
    teacher: list[jax.Array],
    center: jax.Array,
    student_temp: float,
    teacher_temp: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(loss, teacher entropy) of student outputs [n, K] for every view and teacher outputs
    for the global views (the first len(teacher) student views are the same crops).

    loss = mean over pairs (i, v), v != i, of mean_b H(q_i, p_v): q_i = softmax((t_i - c) /
    teacher_temp) with no gradient, p_v = softmax(s_v / student_temp). The entropy is the mean
    of H(q_i), so loss - entropy is the mean KL(q || p) >= 0.
    """
    targets = [jax.nn.softmax(jax.lax.stop_gradient((t - center) / teacher_temp)) for t in teacher]
    log_probs = [jax.nn.log_softmax(s / student_temp) for s in student]
    terms = [
        jnp.mean(jnp.sum(-q * log_probs[v], axis=-1))
        for i, q in enumerate(targets)
        for v in range(len(student))
        if v != i
    ]
    entropy = jnp.mean(jnp.stack([jnp.mean(jnp.sum(-q * jnp.log(q + 1e-12), -1)) for q in targets]))
    return jnp.mean(jnp.stack(terms)), entropy


def teacher_temperature(step: jax.Array, start: float, end: float, warmup_steps: int):
    """Linear warmup start -> end over `warmup_steps`, then `end` (DINO's schedule)."""
    fraction = jnp.clip(jnp.asarray(step, jnp.float32) / max(warmup_steps, 1), 0.0, 1.0)
    return start + (end - start) * fraction if warmup_steps > 0 else jnp.asarray(end)


def dino(
    model: nn.Module,
    teacher_model: nn.Module,
    views,
    *,
    head: DINOHead,
    total_steps: int,
    ema_momentum: float,
    center_momentum: float,
    student_temp: float,
    teacher_temp: tuple[float, float],
    teacher_temp_warmup_steps: int,
    freeze_last_layer_steps: int,
) -> Method:
    """DINO on `model` (student) and `teacher_model` (the same network, no drop path)."""
    student = SSLNetwork(model, heads=(("head", head),), axis_name=model.axis_name)
    teacher = SSLNetwork(teacher_model, heads=(("head", head),), axis_name=model.axis_name)
    num_global = 2

    def init(rng, batch):
        variables = student.init({"params": rng}, batch["image"], train=False)
        params = variables.pop("params")
        state = dict(variables)
        extra = {
            "teacher": params,  # starts equal to the student (arrays are immutable)
            "teacher_state": state,
            "center": jnp.zeros((head.out_dim,), jnp.float32),
            "step": jnp.zeros((), jnp.int32),  # the schedules inside the loss read it
        }
        return params, state, extra

    def loss(params, model_state, extra, batch, rng, *, train, axis_name=None):
        step = extra["step"]
        # The last layer gets no gradient while frozen (DINO cancels its gradient).
        last = params["head"]["last_layer"]
        frozen = step < freeze_last_layer_steps
        last = jnp.where(frozen, jax.lax.stop_gradient(last), last)
        params = {**params, "head": {**params["head"], "last_layer": last}}
        images = [batch[view.key] for view in views]
        student_rng, teacher_rng = jax.random.split(rng)
        outputs, new_state = forward_views(
            student,
            {"params": params, **model_state},
            images,
            train=train,
            rng=student_rng,
            mutable=list(model_state),
        )
        teacher_outputs, teacher_state = forward_views(
            teacher,
            {"params": extra["teacher"], **extra["teacher_state"]},
            images[:num_global],
            train=train,
            rng=teacher_rng,
            mutable=list(extra["teacher_state"]),
        )
        temperature = teacher_temperature(step, *teacher_temp, teacher_temp_warmup_steps)
        teacher_logits = [jax.lax.stop_gradient(out[1]) for out in teacher_outputs]
        value, entropy = dino_loss(
            [out[1] for out in outputs], teacher_logits, extra["center"], student_temp, temperature
        )
        metrics = {
            "teacher_entropy": entropy,
            "kl": value - entropy,
            "teacher_temp": temperature,
            "embedding_std": embedding_std(outputs[0][0], axis_name),  # student backbone features
            "teacher_embedding_std": embedding_std(teacher_outputs[0][0], axis_name),
        }
        aux = {
            "teacher_state": teacher_state,
            "batch_center": parallel.batch_mean(jnp.concatenate(teacher_logits), axis_name),
        }
        return value, (metrics, new_state, aux)

    def update_extra(extra, params, aux, step):
        momentum = cosine_increase(step, total_steps, ema_momentum)
        return {
            "teacher": ema(extra["teacher"], params, momentum),
            "teacher_state": aux["teacher_state"],
            "center": center_momentum * extra["center"]
            + (1.0 - center_momentum) * aux["batch_center"],
            "step": step + 1,
        }

    def features(params, model_state, extra, images):
        del params, model_state  # the teacher is the evaluated network
        variables = {"params": extra["teacher"], **extra["teacher_state"]}
        return teacher.apply(variables, images, train=False)[0]

    return Method(
        name="dino",
        views=tuple(views),
        init=init,
        loss=loss,
        update_extra=update_extra,
        features=features,
        task="self-supervised",
    )


@METHODS.register(name="dino", metadata={"classifier": False})
def build(
    config: Any, model: nn.Module, spec: Any, *, total_steps: int, steps_per_epoch: int, **_
) -> Method:
    m = config.method
    check_feature_task("dino", spec, config.evals.names)
    size = crop_size(config, spec)
    local_size = m.local_crop_size or max(8, round(size * 96 / 224))
    if m.num_local_crops < 0 or not 0 < local_size <= size:
        raise ValueError(
            f"DINO's views: method.num_local_crops={m.num_local_crops} must be >= 0 and "
            f"method.local_crop_size={local_size} in 1..{size} (the global crop size)"
        )
    blur = m.blur
    views = [
        crop_view(
            i,
            size,
            (m.crop_min_scale, 1.0),
            color_jitter=m.color_jitter,
            blur_prob=(1.0, 0.1)[i] if blur else 0.0,
            solarize_prob=(0.0, 0.2)[i],
            interpolation="bicubic",
        )
        for i in range(2)
    ] + [
        crop_view(
            2 + i,
            local_size,
            (m.local_crop_min_scale, m.crop_min_scale),
            color_jitter=m.color_jitter,
            blur_prob=0.5 if blur else 0.0,
            solarize_prob=0.0,
            interpolation="bicubic",
        )
        for i in range(m.num_local_crops)
    ]
    channels = spec.image_shape[2] if spec.image_shape else 3
    check_view_sizes(model, [size, local_size], channels)
    head = DINOHead(
        out_dim=m.out_dim,
        hidden_dim=m.proj_hidden_dim or 2048,
        bottleneck_dim=m.proj_dim or 256,
        batch_norm=m.head_batch_norm,
    )
    teacher_model = model.clone(drop_path_rate=0.0) if hasattr(model, "drop_path_rate") else model
    return dino(
        model,
        teacher_model,
        views,
        head=head,
        total_steps=total_steps,
        ema_momentum=m.ema_momentum,
        center_momentum=m.center_momentum,
        student_temp=m.temperature,
        teacher_temp=(m.teacher_temp_start, m.teacher_temp),
        teacher_temp_warmup_steps=round(m.teacher_temp_warmup_epochs * steps_per_epoch),
        freeze_last_layer_steps=round(m.freeze_last_layer_epochs * steps_per_epoch),
    )


def check_view_sizes(model: nn.Module, sizes: list[int], channels: int) -> None:
    """Traces `model` (shapes only) at each view size: a size it cannot take (a ViT patch or a
    Swin window that does not divide it) is an error naming the view, before compilation."""
    for size in sorted(set(sizes)):
        try:
            jax.eval_shape(
                lambda s=size: model.init(
                    jax.random.PRNGKey(0), jnp.zeros((1, s, s, channels)), train=False
                )
            )
        except Exception as e:  # noqa: BLE001 - re-raised as a config error
            raise ValueError(
                f"the model cannot take DINO's {size}x{size} crops ({type(e).__name__}: {e}); "
                "choose method.crop_size / method.local_crop_size that fit it (a ViT's patch "
                "size and a Swin's window must divide them)"
            ) from None
