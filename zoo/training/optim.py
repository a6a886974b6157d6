"""The optax optimizer of a run, from config: schedule, weight-decay mask, clipping.

    tx, schedule = build_optimizer(config.optim, config.schedule, total_steps, steps_per_epoch)

Weight decay is applied to kernels only: biases, normalisation scales, position embeddings
and class tokens are masked off (as timm and big_vision do), and it is never part of the loss.

`optim.freeze_backbone=True` trains the classifier head only (a linear probe): the updates of
every other parameter are set to zero (optax.multi_transform), so the backbone's weights do
not move; BatchNorm running statistics are model state, not parameters, and still follow
the new data in training mode.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "relative_position_bias_table")


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: matrices/kernels, not vectors or tokens."""

    def keep(path, leaf) -> bool:
        names = [str(getattr(p, "key", p)) for p in path]
        return leaf.ndim > 1 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def build_schedule(cfg: Any, peak_lr: float, total_steps: int, steps_per_epoch: int):
    warmup = int(cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(total_steps - 1, 0))
    if cfg.name == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak_lr,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=peak_lr * cfg.end_lr_factor,
        )
    if cfg.name == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak_lr, warmup), optax.constant_schedule(peak_lr)],
            [warmup],
        )
    raise ValueError(f"schedule.name must be 'cosine' or 'constant', got '{cfg.name}'")


def head_labels(head: tuple[str, ...]):
    """params -> a tree of "head" / "backbone" labels by top-level name (optax.multi_transform)."""

    def labels(params: Any) -> Any:
        return {
            name: jax.tree.map(lambda _, n=name: "head" if n in head else "backbone", subtree)
            for name, subtree in params.items()
        }

    return labels


def build_optimizer(
    optim: Any,
    schedule_cfg: Any,
    total_steps: int,
    steps_per_epoch: int,
    head: tuple[str, ...] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (tx, schedule) for optim.name in {"sgd", "adamw"}.

    Args:
      optim, schedule_cfg: the config's `optim` and `schedule` namespaces.
      total_steps, steps_per_epoch: lengths of the run, for the schedule.
      head: top-level parameter names of the classifier head (the model's registered `head`);
        needed by `optim.freeze_backbone`.
    """
    schedule = build_schedule(schedule_cfg, optim.lr, total_steps, steps_per_epoch)
    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    if optim.name == "sgd":
        if optim.weight_decay > 0:
            parts.append(optax.add_decayed_weights(optim.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov))
    elif optim.name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=optim.b1,
                b2=optim.b2,
                eps=optim.eps,
                weight_decay=optim.weight_decay,
                mask=decay_mask,
            )
        )
    else:
        raise ValueError(f"optim.name must be 'sgd' or 'adamw', got '{optim.name}'")
    tx = optax.chain(*parts)
    if optim.get("freeze_backbone", False):
        if not head:
            raise ValueError(
                "optim.freeze_backbone needs the names of the head parameters; pass the model's "
                "registered head (zoo.model_entry(name).head) to build_optimizer"
            )
        tx = optax.multi_transform(
            {"head": tx, "backbone": optax.set_to_zero()}, head_labels(tuple(head))
        )
    return tx, schedule
