"""The collectives of the one step, decided in one place (DESIGN.md, "Step").

The train and eval steps (zoo/training/step.py), the methods and the models are written once
and call these helpers with the step's `axis_name`:

  * `None` under `jax.jit` over a ('data',) mesh: arrays are global, so a mean over the batch
    is already over every device and these helpers are the plain array operations;
  * `"data"` under `jax.pmap(axis_name="data")`: each device sees its own slice of the batch,
    and the helpers insert the collective (pmean, psum, all_gather, ppermute).

Randomness that differs per example (dropout masks, stochastic depth, colour jitter) is keyed
by the example's index in the global batch (`example_keys`), and randomness shared by the
batch (mixup's lam, the cutmix box) by the step's rng alone, so that jit, pmap and one device
draw the same numbers for the same example.

    grads = parallel.mean(grads, axis_name)
    keys = parallel.example_keys(rng, images.shape[0], axis_name)  # one per example
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DATA_AXIS = "data"  # the mesh axis under jit, the pmap axis name under pmap


def mean(tree: Any, axis_name: str | None) -> Any:
    """Mean over devices of equal-sized shards (gradients, metrics that are batch means)."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def total(tree: Any, axis_name: str | None) -> Any:
    """Sum over devices (the eval step's sums and counts)."""
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def gather(x: jax.Array, axis_name: str | None) -> jax.Array:
    """[n, ...] per device -> [devices * n, ...], the global batch in order (SimCLR's keys)."""
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def batch_mean(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Mean over axis 0 of the global batch (DINO's centre update)."""
    return mean(jnp.mean(x, axis=0), axis_name)


def reverse(x: jax.Array, axis_name: str | None) -> jax.Array:
    """The global batch in reverse order, this device's rows of it (mixup's partner: example
    i is mixed with example N - 1 - i). Under pmap the rows come from the mirror device."""
    if axis_name is None:
        return x[::-1]
    devices = jax.lax.axis_size(axis_name)
    mirror = [(d, devices - 1 - d) for d in range(devices)]
    return jax.lax.ppermute(x[::-1], axis_name, mirror)


def example_index(n: int, axis_name: str | None) -> jax.Array:
    """The global batch indices [n] int32 of this device's n examples."""
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
    return offset + jnp.arange(n, dtype=jnp.int32)


def example_keys(rng: jax.Array, n: int, axis_name: str | None) -> jax.Array:
    """One key per example of this device's n: `fold_in(rng, global index)`."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, example_index(n, axis_name))
