"""The EMA of the weights (optim.ema_decay, zoo/training/ema.py): the formula against numpy,
the train step's EMA under jit and pmap against a numpy EMA of the successive weights (a
skipped non-finite update included), and a run that resumes, evaluates the EMA and predicts
with it."""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zoo
from zoo.methods.supervised import supervised
from zoo.training import ema as ema_lib
from zoo.training import loop
from zoo.training import step as step_lib
from zoo.training.checkpoint import restore_on_this_host
from zoo.training.state import TrainState


def numpy_decay(t, decay, warmup):
    return min(decay, (1 + t) / (10 + t)) if warmup else decay


@pytest.mark.parametrize("warmup", [True, False])
def test_update_ema_is_the_formula(warmup):
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    model_state = {"batch_stats": {"mean": np.ones(2, np.float32)}, "count": np.int32(0)}
    ema = ema_lib.init_ema(params, model_state)
    want = jax.tree.map(np.asarray, ema)
    update = jax.jit(ema_lib.update_ema)
    for t in range(5):
        params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32), params)
        model_state = {"batch_stats": {"mean": model_state["batch_stats"]["mean"] * 2}}
        model_state["count"] = np.int32(t + 1)
        ema = update(ema, params, model_state, ema_lib.ema_decay(jnp.int32(t), 0.9, warmup))
        d = numpy_decay(t, 0.9, warmup)
        new = {"params": params, "model_state": model_state}
        want = jax.tree.map(lambda e, n, d=d: d * e + (1 - d) * n, want, new)
        want["model_state"]["count"] = np.int32(t + 1)  # not floating: the new value
        for got, expected in zip(jax.tree.leaves(ema), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
            assert got.dtype == np.asarray(expected).dtype
    # TF's warmup: 0.1 at the first update, 0.5 at t=8, the decay itself from t ~ 90,000.
    decays = [float(ema_lib.ema_decay(jnp.int32(t), 0.9999)) for t in (0, 8, 100_000)]
    assert decays == pytest.approx([0.1, 0.5, 0.9999])
    # A bfloat16 parameter's average stays bfloat16 (the state keeps its layout).
    half = {"params": {"w": jnp.ones(2, jnp.bfloat16)}, "model_state": {}}
    averaged = ema_lib.update_ema(half, {"w": jnp.zeros(2, jnp.bfloat16)}, {}, jnp.float32(0.5))
    assert averaged["params"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(averaged["params"]["w"].astype(np.float32), [0.5, 0.5])


class Tiny(nn.Module):
    """BatchNorm + Dense: parameters and BatchNorm statistics, compiled in moments."""

    num_classes: int = 3
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(
            x.reshape(len(x), -1)
        )
        return nn.Dense(self.num_classes)(x)


def nan_on_bad(method):
    """The method with a NaN loss where the batch says so (the skipped update)."""

    def loss(params, model_state, extra, batch, rng, **kwargs):
        value, aux = method.loss(params, model_state, extra, batch, rng, **kwargs)
        return jnp.where(jnp.any(batch["bad"]), jnp.nan, value), aux

    return dataclasses.replace(method, loss=loss)


def tiny_steps(mode, decay=0.9, steps=4, bad_step=2):
    """The EMA after `steps` steps of Tiny with a skipped non-finite update at `bad_step`,
    and a numpy EMA of the weights the steps reached."""
    parallel = step_lib.Parallel(step_lib.make_mesh(), mode)
    method = nan_on_bad(supervised(Tiny(axis_name=parallel.axis_name), 3))
    rng = np.random.default_rng(1)
    batches = [
        {
            "image": rng.normal(size=(8, 2, 2, 1)).astype(np.float32),
            "label": np.arange(8) % 3,
            "bad": np.full(8, t == bad_step),
        }
        for t in range(steps)
    ]
    tx = optax.sgd(0.1, momentum=0.9)
    params, model_state, _ = supervised(Tiny(), 3).init(jax.random.PRNGKey(0), batches[0])
    ema = ema_lib.init_ema(params, model_state)
    state = TrainState(jnp.int32(0), params, model_state, tx.init(params), {}, ema)
    state = parallel.put_state(jax.device_put(state, step_lib.shardings(parallel.mesh)[0]))
    train = parallel.compile_train_step(
        method=method,
        tx=tx,
        augment=lambda b, r, axis_name=None: b,
        schedule=lambda s: 0.1,
        skip_nonfinite=True,
        ema_decay=decay,
    )
    want = jax.device_get({"params": params, "model_state": model_state})
    for t, batch in enumerate(batches):
        state, _ = train(state, parallel.put_batch(batch), jax.random.PRNGKey(2))
        now = jax.device_get(parallel.get_state(state))
        if t != bad_step:  # a skipped update keeps the EMA as it was
            d = numpy_decay(t, decay, True)
            new = {"params": now.params, "model_state": now.model_state}
            want = jax.tree.map(lambda e, n, d=d: d * e + (1 - d) * n, want, new)
        for got, expected in zip(jax.tree.leaves(now.ema), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")
    return now.ema


def test_train_step_ema_under_jit_and_pmap_is_the_numpy_ema():
    jit, pmap = tiny_steps("jit"), tiny_steps("pmap")
    for a, b in zip(jax.tree.leaves(jit), jax.tree.leaves(pmap), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def tiny_run_config(**changes):
    from configs.default import get_config

    config = get_config()
    config.model.name = "resnet8"
    config.total_steps = 4
    config.data.batch_size = 16
    config.data.eval_batch_size = 1000
    config.checkpoint.every_steps = 2
    config.logging.every_steps = 2
    config.optim.ema_decay = 0.9
    for key, value in changes.items():
        *section, field = key.split(".")
        (config[section[0]] if section else config)[field] = value
    return config


def test_ema_resumes_is_evaluated_and_predicts(tmp_path, capsys):
    # 4 steps with checkpoints at 2 and 4; then checkpoint 4 is removed and the run resumes
    # from 2 (without evaluation, to save time): the same EMA at step 4.
    workdir = tmp_path / "run"
    results = loop.run(tiny_run_config(), workdir)
    assert {"accuracy", "ema_accuracy", "ema_loss"} <= results.keys()
    assert "ema_confusion" not in results and "ema_count" not in results
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("ema_accuracy" in r for r in records)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["eval_ema_accuracy"] == pytest.approx(results["ema_accuracy"])
    state = workdir / "checkpoints/4/state"
    uninterrupted = jax.device_get(restore_on_this_host(state))
    shutil.rmtree(workdir / "checkpoints/4")
    loop.run(tiny_run_config(**{"evals.names": ""}), workdir)
    assert "resumed at step 2" in capsys.readouterr().out
    resumed = jax.device_get(restore_on_this_host(state))
    assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
    jax.tree_util.tree_map_with_path(
        lambda path, got, want: np.testing.assert_array_equal(
            got, want, jax.tree_util.keystr(path)
        ),
        resumed["ema"],
        uninterrupted["ema"],
    )
    # The EMA moved off the weights it averages, and the classifier uses it by default.
    ema, raw = zoo.load_classifier(workdir), zoo.load_classifier(workdir, weights="raw")
    assert "EMA weights" in ema.description and "EMA" not in raw.description
    with pytest.raises(ValueError, match="weights must be 'ema' or 'raw'"):
        zoo.load_classifier(workdir, weights="average")
    for classifier, want in ((ema, resumed["ema"]), (raw, resumed)):
        got = classifier.variables["params"]["fc"]["kernel"]
        np.testing.assert_array_equal(got, want["params"]["fc"]["kernel"])
        got = classifier.variables["batch_stats"]["bn1"]["mean"]
        np.testing.assert_array_equal(got, want["model_state"]["batch_stats"]["bn1"]["mean"])
    assert not np.array_equal(
        ema.variables["params"]["fc"]["kernel"], resumed["params"]["fc"]["kernel"]
    )
    # Fine-tuning from the workdir loads its EMA (the weights the run reported), and the new
    # run's EMA starts from them (not the random ones), so after one update (decay 0.1 with
    # the warmup) it is 0.1 loaded + 0.9 new.
    config = tiny_run_config(**{"total_steps": 1, "init_from": str(workdir), "evals.names": ""})
    loop.run(config, tmp_path / "finetune")
    tuned = jax.device_get(restore_on_this_host(tmp_path / "finetune/checkpoints/1/state"))
    loaded = resumed["ema"]["params"]
    want = jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, loaded, tuned["params"])
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6),
        tuned["ema"]["params"],
        want,
    )


class Position:
    """A data iterator's position, for the Checkpointer."""

    def get_state(self):
        return {"index": 0}

    def set_state(self, state):
        pass


def small_state(ema: bool) -> TrainState:
    params, model_state = {"w": jnp.ones((2, 2))}, {"batch_stats": {"mean": jnp.zeros(2)}}
    return TrainState(
        jnp.int32(1),
        params,
        model_state,
        {},
        {},
        ema_lib.init_ema(params, model_state) if ema else None,
    )


@pytest.mark.parametrize("saved, resumed", [(False, True), (True, False)])
def test_resuming_with_another_ema_setting_names_the_key(tmp_path, saved, resumed):
    import ml_collections

    from zoo.training.checkpoint import Checkpointer, CheckpointError

    config = ml_collections.ConfigDict({"model": {"name": "m"}, "method": {"name": "s"}})
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(1, small_state(saved), Position(), config)
    if not saved:  # without an EMA, the checkpoint's state is the one zoo wrote before EMA
        assert set(restore_on_this_host(tmp_path / "checkpoints/1/state")) == {
            "step",
            "params",
            "model_state",
            "opt_state",
            "extra",
        }
    restored = checkpointer.restore(small_state(saved), Position(), config)
    assert (restored.ema is not None) == saved
    with pytest.raises(CheckpointError, match="an EMA of the weights.*optim.ema_decay"):
        checkpointer.restore(small_state(resumed), Position(), config)
    checkpointer.close()


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan")])
def test_bad_ema_decay_is_an_error_before_anything_is_compiled(tmp_path, decay):
    with pytest.raises(ValueError, match=r"optim.ema_decay must be in \[0, 1\) .* got"):
        loop.run(tiny_run_config(**{"optim.ema_decay": decay}), tmp_path)
