"""THE train and eval steps: pure functions shared by every model and every method.

Statics are bound with `functools.partial` and the body is compiled in one of two modes
(`Parallel`, config `parallel.mode`):

  * "jit": `jax.jit` with `NamedSharding` over a ('data',) mesh. Arrays are global, so
    reductions over the batch (gradients, BatchNorm statistics) are over the global batch
    without explicit collectives; the state is one replicated array per leaf.
  * "pmap": `jax.pmap(axis_name="data")`: the same body runs per device on its slice of the
    batch and zoo/parallel.py's helpers insert the collectives (pmean of gradients and
    metrics, BatchNorm statistics through the models' `axis_name`, all_gather of SimCLR's
    negatives, psum of eval sums); the state carries a leading device axis.

Both give the same numbers as one device (tests/test_parallel.py). On CPU devices the
programs are traced with zoo's CPU policy for those devices (`zoo.cpu.policy_for`).

    parallel = Parallel(make_mesh(), "pmap")
    step = parallel.compile_train_step(method=method, tx=tx, augment=augment, schedule=schedule)
    state, metrics = step(parallel.put_state(state), parallel.put_batch(batch), rng)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zoo import cpu, parallel
from zoo.parallel import DATA_AXIS
from zoo.training import ema as ema_lib
from zoo.training.state import TrainState

MODES = ("jit", "pmap")


def micro_batches(batch: dict, steps: int, shards: int) -> dict:
    """[B, ...] -> [steps, B / steps, ...]: micro-batch j holds the j-th slice of each of the
    `shards` equal parts of the batch (each device's part under jit), so that it is spread
    over every device and jit and pmap group the same examples."""

    def split(x):
        x = x.reshape(shards, steps, -1, *x.shape[1:]).swapaxes(0, 1)
        return x.reshape(steps, -1, *x.shape[3:])

    return jax.tree.map(split, batch)


def _mean_over_micro_batches(tree: Any) -> Any:
    """Floating leaves averaged over the leading micro-batch axis; others: the last one."""
    return jax.tree.map(
        lambda x: x.mean(0) if jnp.issubdtype(x.dtype, jnp.floating) else x[-1], tree
    )


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
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
    ema_warmup: bool = True,
    shards: int = 1,
    axis_name: str | None = None,
):
    """One optimizer update. Returns (new_state, metrics) with scalar metrics.

    With `grad_accum_steps` k > 1 the batch is cut into k micro-batches (`micro_batches`,
    `shards`: the number of devices under jit) whose gradients are averaged in a `lax.scan`:
    the update of the whole batch with the activations of one micro-batch. Each micro-batch
    normalises with its own BatchNorm statistics, and the running averages (and `aux`, e.g.
    DINO's centre) take the mean over the micro-batches, once per step.

    A NaN or infinite loss or gradient norm in the metrics stops the run (the loop checks them
    on the host, zoo/training/loop.py); with `skip_nonfinite` such a step leaves params,
    optimizer state, model state, extra and EMA as they were (only `step` advances). Without
    it the program is the plain step: a flag computed in it slowed small models (SPEED.md).

    With `ema_decay` > 0 the state's `ema` (zoo/training/ema.py) moves towards the updated
    params and model state, with the decay `ema_decay(state.step, ema_decay, ema_warmup)`.
    """
    if ema_decay and state.ema is None:
        raise ValueError(
            "train_step has ema_decay > 0 but the state has no EMA: build the state with one "
            "(zoo.training.loop.init_state(..., ema=True), or state.replace(ema=init_ema(...)))"
        )
    rng = jax.random.fold_in(rng, state.step)  # never stored: the step makes it unique
    augment_rng, loss_rng = jax.random.split(rng)
    batch = augment(batch, augment_rng, axis_name)

    def loss_and_grad(batch, rng):
        def loss_fn(params):
            return method.loss(
                params, state.model_state, state.extra, batch, rng, train=True, axis_name=axis_name
            )

        return jax.value_and_grad(loss_fn, has_aux=True)(state.params)

    if grad_accum_steps == 1:
        (loss, (metrics, model_state, aux)), grads = loss_and_grad(batch, loss_rng)
    else:

        def accumulate(grad_sum, inputs):
            index, micro = inputs
            out, grads = loss_and_grad(micro, jax.random.fold_in(loss_rng, index))
            return jax.tree.map(jnp.add, grad_sum, grads), out

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro = micro_batches(batch, grad_accum_steps, shards)
        grads, outs = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
        loss, (metrics, model_state, aux) = _mean_over_micro_batches(outs)
    grads = parallel.mean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    extra = method.update_extra(state.extra, params, aux, state.step)  # e.g. the EMA teacher
    ema = state.ema
    if ema_decay:
        decay = ema_lib.ema_decay(state.step, ema_decay, ema_warmup)
        ema = ema_lib.update_ema(ema, params, model_state, decay)
    grad_norm = optax.global_norm(grads)
    if skip_nonfinite:
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updated = (params, model_state, opt_state, extra, ema)
        old = (state.params, state.model_state, state.opt_state, state.extra, state.ema)
        updated = jax.tree.map(lambda new, kept: jnp.where(finite, new, kept), updated, old)
        params, model_state, opt_state, extra, ema = updated
    metrics = parallel.mean({**metrics, "loss": loss}, axis_name)  # means of equal shards
    metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state.step)}
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        model_state=model_state,
        opt_state=opt_state,
        extra=extra,
        ema=ema,
    )
    return new_state, metrics


def eval_step(
    state: TrainState,
    batch,
    *,
    method,
    augment,
    output: str = "sums",
    axis_name: str | None = None,
):
    """The method's sums over the masked batch (`output="sums"`, classifiers:
    `method.eval_sums`: loss, count and the task's counts, e.g. top-1/top-5 correct and a
    confusion matrix for multiclass; summed over devices), or its features [B, D]
    (`output="features"`, for the k-NN and linear-probe evaluators; padded rows are the
    caller's to drop by `mask`).

    Sums (not means) so that batches and devices combine exactly (scenic's (sum, count)).
    `per_example` rows (ranking metrics) stay with their device.
    """
    batch = augment(batch, jax.random.PRNGKey(0))
    if output == "features":
        return method.features(state.params, state.model_state, state.extra, batch["image"])
    logits = method.logits(state.params, state.model_state, batch["image"])
    sums = dict(method.eval_sums(logits, batch))
    per_example = sums.pop("per_example", None)
    sums = parallel.total(sums, axis_name)
    return sums if per_example is None else {**sums, "per_example": per_example}


def make_mesh(devices=None) -> Mesh:
    """A 1-D ('data',) mesh over `devices` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(devices, (DATA_AXIS,))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded along 'data')."""
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _traced(fn, mesh: Mesh, policy: cpu.CpuPolicy | None = None):
    """fn traced with `policy` (default: the process's) where `mesh`'s devices are CPUs, with
    XLA's native operations elsewhere (zoo.cpu.policy_for)."""
    return cpu.traced(fn, cpu.policy_for(mesh.devices.ravel().tolist(), policy))


def compile_train_step(mesh: Mesh, policy: cpu.CpuPolicy | None = None, **statics):
    """The train step under `jax.jit` over `mesh` (state donated), traced with the CPU
    `policy` (default: the process's) on CPU devices."""
    replicated, data = shardings(mesh)
    return jax.jit(
        _traced(functools.partial(train_step, shards=mesh.size, **statics), mesh, policy),
        in_shardings=(replicated, data, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def compile_eval_step(mesh: Mesh, **statics):
    """The eval step under `jax.jit` over `mesh`."""
    replicated, data = shardings(mesh)
    features = statics.get("output") == "features"
    platform = mesh.devices.ravel()[0].platform
    return jax.jit(
        _traced(functools.partial(eval_step, **statics), mesh),
        in_shardings=(replicated, data),
        out_shardings=data if features else replicated,
        compiler_options=cpu.forward_compiler_options(platform),  # XLA:CPU's for a forward
    )


def device_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> global arrays sharded along 'data'."""
    _, data = shardings(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(data, x), batch)


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How the steps are compiled (`mode`: "jit" or "pmap") over the devices of `mesh`, and
    where their inputs and outputs live. The loop and the evaluators go through it, so they
    are the same code in both modes.

    States outside the steps (init, checkpoints, `init_from`) are always global replicated
    arrays; `put_state` gives a step its mode's layout and `get_state` takes it back.
    """

    mesh: Mesh
    mode: str = "jit"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(
                f"parallel.mode must be one of {', '.join(MODES)}, got '{self.mode}' (jit: one "
                "program over all devices; pmap: one program per device)"
            )

    @property
    def axis_name(self) -> str | None:
        """The collectives' axis name in the step (zoo/parallel.py); None under jit."""
        return DATA_AXIS if self.mode == "pmap" else None

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def _pmap(self, fn, **kwargs):
        devices = self.mesh.devices.tolist()
        devices = None if len(devices) == jax.device_count() else devices  # None: all of them
        fn = _traced(fn, self.mesh)
        return jax.pmap(fn, axis_name=DATA_AXIS, devices=devices, **kwargs)

    def compile_train_step(self, **statics):
        if self.mode == "jit":
            return compile_train_step(self.mesh, **statics)
        step = functools.partial(train_step, axis_name=DATA_AXIS, **statics)
        return self._pmap(step, in_axes=(0, 0, None), donate_argnums=(0,))

    def compile_eval_step(self, **statics):
        if self.mode == "jit":
            return compile_eval_step(self.mesh, **statics)
        return self._pmap(functools.partial(eval_step, axis_name=DATA_AXIS, **statics))

    def put_batch(self, batch: dict) -> dict:
        """This process's numpy batch [b, ...] -> the step's input: global arrays sharded
        along 'data' (jit), or [devices, b / local devices, ...] (pmap)."""
        if self.mode == "jit":
            return device_batch(batch, self.mesh)
        local = len(self.mesh.local_devices)
        _, data = shardings(self.mesh)

        def put(x):
            if x.shape[0] % local:
                raise ValueError(
                    f"a batch of {x.shape[0]} does not divide over {local} local devices"
                )
            return jax.make_array_from_process_local_data(
                data, x.reshape(local, x.shape[0] // local, *x.shape[1:])
            )

        return jax.tree.map(put, batch)

    def put_state(self, state: Any) -> Any:
        """A global replicated state -> the train step's layout (pmap: a leading device axis,
        one copy per device)."""
        if self.mode == "jit":
            return state
        _, data = shardings(self.mesh)

        def stack(x):
            copies = [shard.data[None] for shard in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(
                (self.num_devices, *x.shape), data, copies
            )

        return jax.tree.map(stack, state)

    def get_state(self, state: Any) -> Any:
        """The train step's state -> global replicated arrays (checkpoints, evaluators)."""
        if self.mode == "jit":
            return state
        replicated, _ = shardings(self.mesh)

        def unstack(x):
            copies = [shard.data[0] for shard in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(x.shape[1:], replicated, copies)

        return jax.tree.map(unstack, state)

    def local_copy(self, tree: Any) -> Any:
        """This process's first copy of replicated outputs (metrics, eval sums), without
        waiting for them; `host` reads them (a copy to the host can start early)."""
        return jax.tree.map(lambda x: x.addressable_data(0), tree)

    def host(self, tree: Any) -> Any:
        """Replicated outputs, or their `local_copy`, -> numpy (pmap: device 0's row)."""
        row = 0 if self.mode == "pmap" else ()
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[row], tree)

    def rows(self, x: jax.Array) -> np.ndarray:
        """A batch output (features, per-example scores) -> the rows of the whole batch, in
        order, as numpy: this process's rows of it, then every process's (`all_processes`)."""
        if x.is_fully_replicated:  # e.g. one device, or jit's replicated per-example sums
            return np.asarray(x.addressable_data(0))
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        rows = np.concatenate([np.asarray(s.data) for s in shards])
        return all_processes(rows.reshape(-1, *x.shape[2:]) if self.mode == "pmap" else rows)


def all_processes(tree: Any) -> Any:
    """Numpy rows of this process -> the rows of every process in process order (the order of
    one process's batches: zoo/data/pipeline.py); unchanged with one process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
