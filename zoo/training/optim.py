"""The optax optimizer of a run, from config: schedule, weight-decay mask, clipping.

    tx, schedule = build_optimizer(config.optim, config.schedule, total_steps, steps_per_epoch)

Optimizers (`optim.name`): "sgd" (momentum, Nesterov), "adamw", "lars" (SimCLR, BYOL),
"lamb" (You et al. 2020, timm's `Lamb`) and "rmsprop_tf" (TensorFlow's RMSProp as timm's
`RMSpropTF`, EfficientNet's recipe); `build_optimizer` says what each one computes.
Schedules (`schedule.name`): "cosine", "constant" and "exponential" (staircase decay by
`schedule.decay_rate` every `schedule.decay_epochs`, EfficientNet's), each after a linear
warmup from 0.

Weight decay is applied to kernels only: biases, normalisation scales, position embeddings
and class tokens are masked off (as timm and big_vision do), and it is never part of the loss.

`optim.freeze_backbone=True` trains the classifier head only (a linear probe): the updates of
every other parameter are set to zero (optax.multi_transform), so the backbone's weights do
not move; BatchNorm running statistics are model state, not parameters, and still follow
the new data in training mode.

`optim.layer_decay=d` (< 1) is layer-wise learning-rate decay for fine-tuning (BEiT, Bao et
al. 2021; timm's `param_groups_layer_decay`): the parameters of layer `i` of `L` get the
learning rate times `d ** (L - i)`. Layer 0 is the embedding/stem (patch embedding, position
embedding, class/distillation tokens, the convolutional stem), layers 1..L-1 are the blocks in
forward order, and layer L (scale 1) is everything after the last block: the final norm, a
ConvNeXt/EfficientNet head conv or norm, and the classifier. Blocks are counted one by one as
timm's fine-grained `group_matcher` does: ViT/DeiT `blocks_i`, Swin `layers_s_blocks_b`,
ConvNeXt `stages_s/blocks_b`, ResNet `layer{s}_{b}`, EfficientNet `blocks_s_b`; a stage's
downsampling layer (Swin, ConvNeXt) joins that stage's first block. (timm puts the final norm
or EfficientNet's `conv_head` one layer below the classifier; BEiT, followed here, gives
them the classifier's rate.) It is a last transformation that scales each parameter's
update, so it scales the weight-decay term with the learning rate, as timm's lr_scale does,
and composes with the schedule and `freeze_backbone`.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "relative_position_bias_table")
OPTIMIZERS = ("sgd", "adamw", "lars", "lamb", "rmsprop_tf")
SCHEDULES = ("cosine", "constant", "exponential")


def check_name(key: str, name: str, known: tuple[str, ...]) -> None:
    """ValueError for a `name` of config `key` that is not one of `known`, with close matches."""
    if name not in known:
        close = difflib.get_close_matches(name, known, n=2, cutoff=0.4)
        hint = f"; did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"{key} must be one of {', '.join(known)}, got '{name}'{hint}")


def check_not_negative(key: str, value: float, note: str = "") -> None:
    """ValueError unless `value` is a finite number >= 0 (NaN and inf included)."""
    if not 0 <= value < float("inf"):
        raise ValueError(f"{key} must be a finite number >= 0, got {value}{note}")


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: matrices/kernels, not vectors or tokens."""

    def keep(path, leaf) -> bool:
        names = [str(getattr(p, "key", p)) for p in path]
        return leaf.ndim > 1 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def build_schedule(cfg: Any, peak_lr: float, total_steps: int, steps_per_epoch: int):
    """The learning rate of each step: a linear warmup from 0 to `peak_lr` over
    `schedule.warmup_steps` (or `warmup_epochs`), then `schedule.name`'s decay:

      cosine       to peak_lr * end_lr_factor at `total_steps`;
      constant     peak_lr;
      exponential  peak_lr * decay_rate ** floor(step / decay_steps), with
                   decay_steps = round(decay_epochs * steps_per_epoch), at least 1; the
                   decay counts from step 0, through the warmup, as TF's EfficientNet code
                   and timm's step scheduler do.
    """
    check_name("schedule.name", cfg.name, SCHEDULES)
    check_not_negative("schedule.warmup_steps", cfg.warmup_steps)
    check_not_negative("schedule.warmup_epochs", cfg.warmup_epochs)
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
    if cfg.name == "exponential":
        if not 0.0 < cfg.decay_rate <= 1.0:
            raise ValueError(
                f"schedule.decay_rate must be in (0, 1] (EfficientNet: 0.97), got {cfg.decay_rate}"
            )
        if not 0.0 < cfg.decay_epochs < float("inf"):
            raise ValueError(
                f"schedule.decay_epochs must be > 0 (EfficientNet: 2.4), got {cfg.decay_epochs}"
            )
        decay_steps = max(round(cfg.decay_epochs * steps_per_epoch), 1)
        rate = cfg.decay_rate

        def exponential(step):
            decayed = peak_lr * rate ** jnp.floor(step / decay_steps)
            return jnp.where(step < warmup, peak_lr * step / max(warmup, 1), decayed)

        return exponential
    raise ValueError(f"schedule.name must be one of {', '.join(SCHEDULES)}, got '{cfg.name}'")


def head_labels(head: tuple[str, ...]):
    """params -> a tree of "head" / "backbone" labels by top-level name (optax.multi_transform)."""

    def labels(params: Any) -> Any:
        return {
            name: jax.tree.map(lambda _, n=name: "head" if n in head else "backbone", subtree)
            for name, subtree in params.items()
        }

    return labels


# Layer-wise lr decay: parameter path (top-level names joined by "/") -> where it sits.
EMBED_NAMES = re.compile(
    r"^(patch_embed|pos_embed|absolute_pos_embed|cls_token|dist_token|stem_\d+|stem|conv_stem"
    r"|conv1|bn1)(/|$)"
)
BLOCK_PATTERNS = (  # a block's ordinal (stage, index) in forward order
    re.compile(r"^blocks_(\d+)(?:_(\d+))?/"),  # ViT/DeiT blocks_i, EfficientNet blocks_s_b
    re.compile(r"^layers_(\d+)_blocks_(\d+)/"),  # Swin
    re.compile(r"^layers_(\d+)_downsample()/"),  # Swin: with the stage's first block
    re.compile(r"^stages_(\d+)/blocks_(\d+)/"),  # ConvNeXt
    re.compile(r"^stages_(\d+)/downsample_\d+()/"),  # ConvNeXt: with the stage's first block
    re.compile(r"^layer(\d+)_(\d+)/"),  # ResNet
)


def _path_name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def _block_ordinal(name: str) -> tuple[int, ...] | None:
    for pattern in BLOCK_PATTERNS:
        match = pattern.match(name)
        if match:
            return tuple(int(g) if g else 0 for g in match.groups())
    return None


def layer_ids(params: Any) -> tuple[Any, int]:
    """(a tree of layer ids like `params`, L): 0 = embedding/stem, 1..L-1 blocks, L = head.

    Raises ValueError when no parameter belongs to a block (a model family this grouping
    does not know), since layer decay would then silently do nothing useful.
    """
    names = jax.tree.leaves(jax.tree_util.tree_map_with_path(lambda p, _: _path_name(p), params))
    ordinals = sorted({o for o in map(_block_ordinal, names) if o is not None})
    if not ordinals:
        raise ValueError(
            "optim.layer_decay: no transformer/residual blocks found among the parameters "
            f"(top-level names: {', '.join(sorted(params)[:8])}, ...); layer decay knows the "
            "ViT/DeiT, Swin, ConvNeXt, ResNet and EfficientNet families"
        )
    block_id = {o: i + 1 for i, o in enumerate(ordinals)}
    top = len(ordinals) + 1

    def layer_id(path, _) -> int:
        name = _path_name(path)
        ordinal = _block_ordinal(name)
        if ordinal is not None:
            return block_id[ordinal]
        return 0 if EMBED_NAMES.match(name) else top

    return jax.tree_util.tree_map_with_path(layer_id, params), top


def layer_scales(params: Any, layer_decay: float) -> Any:
    """The learning-rate multiplier of every parameter: `layer_decay ** (L - layer id)`."""
    ids, top = layer_ids(params)
    return jax.tree.map(lambda i: float(layer_decay ** (top - i)), ids)


def scale_by_layer_decay(layer_decay: float) -> optax.GradientTransformation:
    """Multiplies each parameter's update by its `layer_scales` (constants, no state)."""

    def init(params):
        layer_ids(params)  # an unknown model family fails here, when the state is built
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        scales = layer_scales(updates, layer_decay)  # from the tree's names, at trace time
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def peak_learning_rate(optim: Any, batch_size: int) -> float:
    """`optim.lr`, times batch_size / `optim.lr_base_batch` when that is set (the linear
    scaling rule of Goyal et al. 2017, which SimCLR, BYOL and DINO state their rates in)."""
    base = optim.get("lr_base_batch", 0)
    if base and batch_size <= 0:
        raise ValueError("optim.lr_base_batch needs the batch size to scale the learning rate")
    return optim.lr * batch_size / base if base else optim.lr


def weight_decay_schedule(optim: Any, total_steps: int):
    """`optim.weight_decay`, or a cosine from it to `optim.weight_decay_end` over the run
    (DINO: 0.04 -> 0.4) when that is >= 0."""
    end = optim.get("weight_decay_end", -1.0)
    if end < 0:
        return optim.weight_decay
    return lambda step: (
        optim.weight_decay
        + (end - optim.weight_decay)
        * (1.0 - jnp.cos(jnp.pi * jnp.clip(step / max(total_steps, 1), 0.0, 1.0)))
        / 2.0
    )


def first_moment_dtype(optim: Any):
    """`optim.mu_dtype` ("" = the parameters' float32, or "bfloat16": half the memory of the
    momentum / Adam's first moment, as big_vision's `mu_dtype`; rmsprop_tf's momentum, LAMB's
    first moment). optax's LARS has no such option, so it is refused there."""
    name = optim.get("mu_dtype", "")
    check_name("optim.mu_dtype", name, ("", "float32", "bfloat16"))
    if name and optim.name == "lars":
        raise ValueError(
            f"optim.mu_dtype={name} applies to sgd, adamw, lamb and rmsprop_tf; LARS keeps its "
            "momentum in float32: unset optim.mu_dtype"
        )
    return {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_optimizer(
    optim: Any,
    schedule_cfg: Any,
    total_steps: int,
    steps_per_epoch: int,
    head: tuple[str, ...] = (),
    batch_size: int = 0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (tx, schedule) for optim.name in `OPTIMIZERS`.

    Every optimizer first clips the global gradient norm to `optim.grad_clip_norm` (when > 0)
    and takes its weight decay on the `decay_mask` parameters only.

    * "sgd": the gradient plus L2 weight decay, momentum `optim.momentum` (Nesterov with
      `optim.nesterov`), times the learning rate.
    * "adamw": Adam (`optim.b1`, `b2`, `eps`) with decoupled weight decay (optax.adamw).
    * "lars" (You et al. 2017, optax.lars), SimCLR's and BYOL's: momentum `optim.momentum`,
      trust coefficient `optim.trust_coefficient`, and biases and normalisation parameters
      excluded from both weight decay and the trust-ratio adaptation.
    * "lamb" (You et al. 2020), as timm's `Lamb`: Adam's bias-corrected step
      m / (sqrt(v) + eps) (`optim.b1`, `b2`, `eps`), plus weight decay * w, times the
      trust ratio ||w|| / ||step|| (1 where either norm is 0), times the learning rate. As
      in timm, only parameters that get weight decay are adapted by the trust ratio (none
      when `optim.weight_decay` is 0). timm's Lamb clips the gradient norm at 1.0 itself;
      here that is `optim.grad_clip_norm=1.0`.
    * "rmsprop_tf", TensorFlow's RMSProp as timm's `RMSpropTF` (EfficientNet's recipe): the
      gradient plus L2 weight decay, g; ms = rho * ms + (1 - rho) * g^2 with ms starting at
      ones and rho = `optim.rms_decay`; buf = momentum * buf + lr * g / sqrt(ms + eps); the
      update is -buf. The learning rate is inside the momentum buffer (unlike optax.rmsprop,
      a difference when it changes) and eps inside the square root (EfficientNet: 1e-3).
      `optim.nesterov` does not apply (TensorFlow's has none).

    Args:
      optim, schedule_cfg: the config's `optim` and `schedule` namespaces.
      total_steps, steps_per_epoch: lengths of the run, for the schedule.
      head: top-level parameter names of the classifier head (the model's registered `head`);
        needed by `optim.freeze_backbone`.
      batch_size: the global batch, for `optim.lr_base_batch`.

    Raises:
      ValueError: for an unknown optimizer or schedule (with close matches), a negative
        learning rate, weight decay, clipping norm or warmup, `freeze_backbone` without
        `head`, `optim.layer_decay` outside (0, 1], `optim.rms_decay` outside [0, 1), or an
        exponential schedule's `decay_rate` outside (0, 1] or `decay_epochs` <= 0.
    """
    check_name("optim.name", optim.name, OPTIMIZERS)
    check_not_negative("optim.lr", optim.lr, " (the peak learning rate, e.g. 0.1 for SGD)")
    check_not_negative("optim.weight_decay", optim.weight_decay)
    check_not_negative("optim.grad_clip_norm", optim.grad_clip_norm, " (0 = no clipping)")
    mu_dtype = first_moment_dtype(optim)
    peak = peak_learning_rate(optim, batch_size)
    schedule = build_schedule(schedule_cfg, peak, total_steps, steps_per_epoch)
    weight_decay = weight_decay_schedule(optim, total_steps)
    decaying = callable(weight_decay) or optim.weight_decay > 0
    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    if optim.name == "sgd":
        if decaying:
            parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
        parts.append(
            optax.sgd(
                schedule,
                momentum=optim.momentum or None,
                nesterov=optim.nesterov,
                accumulator_dtype=mu_dtype,
            )
        )
    elif optim.name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=optim.b1,
                b2=optim.b2,
                eps=optim.eps,
                mu_dtype=mu_dtype,
                weight_decay=weight_decay,
                mask=decay_mask,
            )
        )
    elif optim.name == "lamb":
        parts.append(optax.scale_by_adam(optim.b1, optim.b2, optim.eps, mu_dtype=mu_dtype))
        if decaying:  # timm adapts only the parameters of a group with weight decay
            parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
            parts.append(optax.masked(optax.scale_by_trust_ratio(), decay_mask))
        parts.append(optax.scale_by_learning_rate(schedule))
    elif optim.name == "rmsprop_tf":
        rho = optim.get("rms_decay", 0.9)
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"optim.rms_decay must be in [0, 1) (TensorFlow's 0.9), got {rho}")
        if decaying:
            parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
        # TensorFlow starts the mean square at ones (optax.rmsprop at zeros), so the first
        # steps are small rather than sign-sized.
        parts.append(optax.scale_by_rms(rho, optim.eps, initial_scale=1.0, eps_in_sqrt=True))
        parts.append(optax.scale_by_learning_rate(schedule))  # before the momentum: TF's order
        if optim.momentum:
            parts.append(optax.trace(optim.momentum, accumulator_dtype=mu_dtype))
    elif optim.name == "lars":
        parts.append(
            optax.lars(
                schedule,
                weight_decay=weight_decay,
                weight_decay_mask=decay_mask,
                trust_coefficient=optim.get("trust_coefficient", 1e-3),
                trust_ratio_mask=decay_mask,
                momentum=optim.momentum,
                nesterov=optim.nesterov,
            )
        )
    else:
        raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got '{optim.name}'")
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
    layer_decay = optim.get("layer_decay", 1.0)
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(
            f"optim.layer_decay must be in (0, 1] (1 = off; fine-tuning uses 0.65-0.9), "
            f"got {layer_decay}"
        )
    if layer_decay < 1.0:
        tx = optax.chain(tx, scale_by_layer_decay(layer_decay))
    return tx, schedule
