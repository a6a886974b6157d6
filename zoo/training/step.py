"""THE train and eval steps: pure functions shared by every model and every method.

Statics are bound with `functools.partial` and the result is compiled by `jax.jit` with
`NamedSharding` over a ('data',) mesh: arrays are global, so gradient and BatchNorm reductions
over the batch are over the global batch without explicit collectives. Under `jax.pmap`
(axis_name="data") the same body runs per device and `cross_replica_mean` inserts the pmean.

    step = compile_train_step(mesh, method=method, tx=tx, augment=augment, schedule=schedule)
    state, metrics = step(state, batch, rng)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoo import backend
from zoo.training.state import TrainState

DATA_AXIS = "data"


def cross_replica_mean(tree: Any, axis_name: str | None) -> Any:
    """Mean over devices under pmap; identity under jit, where arrays are already global."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def train_step(
    state: TrainState,
    batch,
    rng,
    *,
    method,
    tx,
    augment,
    schedule,
    skip_nonfinite: bool = False,
    axis_name: str | None = None,
):
    """One optimizer update. Returns (new_state, metrics) with scalar metrics.

    A NaN or infinite loss or gradient norm in the metrics stops the run (the loop checks them
    on the host, zoo/training/loop.py); with `skip_nonfinite` such a step leaves params,
    optimizer state, model state and extra as they were (only `step` advances). Without it
    the program is the plain step: a flag computed in it slowed small models (SPEED.md).
    """
    rng = jax.random.fold_in(rng, state.step)  # never stored: the step makes it unique
    augment_rng, loss_rng = jax.random.split(rng)
    batch = augment(batch, augment_rng)

    def loss_fn(params):
        return method.loss(
            params, state.model_state, state.extra, batch, loss_rng, train=True, axis_name=axis_name
        )

    (loss, (metrics, model_state, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    grads = cross_replica_mean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    extra = method.update_extra(state.extra, params, aux, state.step)  # e.g. the EMA teacher
    grad_norm = optax.global_norm(grads)
    if skip_nonfinite:
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updated = (params, model_state, opt_state, extra)
        old = (state.params, state.model_state, state.opt_state, state.extra)
        updated = jax.tree.map(lambda new, kept: jnp.where(finite, new, kept), updated, old)
        params, model_state, opt_state, extra = updated
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        extra=extra,
    )
    return new_state, cross_replica_mean(metrics, axis_name)


def eval_step(
    state: TrainState,
    batch,
    *,
    method,
    augment,
    output: str = "sums",
    num_classes: int | None = None,
):
    """The method's sums over the masked batch (`output="sums"`, classifiers:
    `method.eval_sums`: loss, count and the task's counts, e.g. top-1/top-5 correct and a
    confusion matrix for multiclass), or its features [B, D] (`output="features"`, for the
    k-NN and linear-probe evaluators; padded rows are the caller's to drop by `mask`).

    Sums (not means) so that batches and devices combine exactly (scenic's (sum, count)).
    `num_classes` is unused (the method knows its classes); it is accepted for old callers.
    """
    del num_classes
    batch = augment(batch, jax.random.PRNGKey(0))
    if output == "features":
        return method.features(state.params, state.model_state, state.extra, batch["image"])
    logits = method.logits(state.params, state.model_state, batch["image"])
    return method.eval_sums(logits, batch)


def make_mesh(devices=None) -> Mesh:
    """A 1-D ('data',) mesh over `devices` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(devices, (DATA_AXIS,))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded along 'data')."""
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def compile_train_step(mesh: Mesh, **statics):
    replicated, data = shardings(mesh)
    return jax.jit(
        functools.partial(train_step, **statics),
        in_shardings=(replicated, data, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def compile_eval_step(mesh: Mesh, **statics):
    replicated, data = shardings(mesh)
    features = statics.get("output") == "features"
    return jax.jit(
        functools.partial(eval_step, **statics),
        in_shardings=(replicated, data),
        out_shardings=data if features else replicated,
        compiler_options=backend.forward_compiler_options(),  # XLA:CPU fusions for a forward
    )


def device_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> global arrays sharded along 'data'."""
    _, data = shardings(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(data, x), batch)
