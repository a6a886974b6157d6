"""The one train step and eval step: learning, BatchNorm modes, masks (8 devices == 1 device,
jit and pmap: tests/test_parallel.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from zoo.data.augment import make_augment
from zoo.methods.supervised import supervised
from zoo.models import create_model
from zoo.training import loop
from zoo.training import step as step_lib
from zoo.training.optim import build_optimizer

BATCH, SIZE, CLASSES = 16, 16, 4


def fixed_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
        "label": rng.integers(0, CLASSES, (BATCH,), dtype=np.int32),
    }


class Setup:
    """A resnet8 train/eval step compiled once per device count, and fresh states for it
    (the train step donates its state, so each test starts from a copy)."""

    def __init__(self, devices):
        config = common.base()
        config.optim.lr = 0.2
        config.schedule.warmup_steps = 1  # step 0 has lr 0: only BatchNorm stats move
        self.mesh = step_lib.make_mesh(devices)
        model = create_model("resnet8", num_classes=CLASSES)
        method = supervised(model, CLASSES)
        tx, schedule = build_optimizer(
            config.optim, config.schedule, total_steps=100, steps_per_epoch=10
        )
        augment = make_augment((0.5,) * 3, (0.25,) * 3)
        self.batch = fixed_batch()
        state = loop.init_state(
            method,
            tx,
            {k: v[:1] for k, v in self.batch.items()},
            augment,
            jax.random.PRNGKey(0),
            self.mesh,
        )
        self.host_state = jax.device_get(state)
        self.train_step = step_lib.compile_train_step(
            self.mesh, method=method, tx=tx, augment=augment, schedule=schedule
        )
        self.eval_step = step_lib.compile_eval_step(self.mesh, method=method, augment=augment)

    def fresh_state(self):
        return jax.device_put(self.host_state, step_lib.shardings(self.mesh)[0])

    def device_batch(self, batch):
        return step_lib.device_batch(batch, self.mesh)

    def run(self, num_steps):
        state, losses = self.fresh_state(), []
        for _ in range(num_steps):
            state, metrics = self.train_step(
                state, self.device_batch(self.batch), jax.random.PRNGKey(1)
            )
            losses.append(float(metrics["loss"]))
        return state, losses


@pytest.fixture(scope="module")
def one_device():
    return Setup(jax.devices()[:1])


def test_loss_decreases_on_a_fixed_batch(one_device):
    _, losses = one_device.run(13)
    assert losses[-1] < 0.6 * losses[1], losses


def test_batchnorm_stats_update_in_train_and_are_used_in_eval(one_device):
    state = one_device.fresh_state()
    before = jax.device_get(state.model_state["batch_stats"])
    params = jax.device_get(state.params)
    eval_batch = one_device.device_batch({**one_device.batch, "mask": np.ones(BATCH, np.float32)})
    loss_before = float(one_device.eval_step(state, eval_batch)["loss"])
    state, _ = one_device.train_step(
        state, one_device.device_batch(one_device.batch), jax.random.PRNGKey(1)
    )
    unchanged = jax.tree.map(np.array_equal, params, jax.device_get(state.params))
    assert all(jax.tree.leaves(unchanged)), "lr is 0 at step 0: params must not move"
    after = jax.device_get(state.model_state["batch_stats"])
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, after)
    assert all(jax.tree.leaves(changed)), "every BatchNorm's running stats must update"
    loss_after = float(one_device.eval_step(state, eval_batch)["loss"])
    assert loss_after != pytest.approx(loss_before, rel=1e-4), "eval must use the running stats"


def test_eval_sums_respect_the_mask(one_device):
    state = one_device.fresh_state()
    full = {**one_device.batch, "mask": np.ones(BATCH, np.float32)}
    half = {**full, "mask": (np.arange(BATCH) < BATCH // 2).astype(np.float32)}
    sums_full = jax.device_get(one_device.eval_step(state, one_device.device_batch(full)))
    sums_half = jax.device_get(one_device.eval_step(state, one_device.device_batch(half)))
    assert sums_full["count"] == BATCH and sums_half["count"] == BATCH // 2
    assert sums_full["confusion"].sum() == BATCH and sums_half["confusion"].sum() == BATCH // 2
    assert sums_half["top1"] <= sums_full["top1"] <= sums_full["top5"]


def test_weight_decay_mask_skips_biases_and_norms():
    from zoo.training.optim import decay_mask

    params = {
        "conv": {"kernel": jnp.ones((3, 3, 2, 2))},
        "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
        "pos_embed": jnp.ones((1, 4, 2)),
    }
    mask = decay_mask(params)
    assert mask == {
        "conv": {"kernel": True},
        "bn": {"scale": False, "bias": False},
        "pos_embed": False,
    }
