"""jit and pmap (zoo/training/step.py `Parallel`), gradient accumulation and evaluation on
any device count: the same numbers as one device (tests/conftest.py forces 8 CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from zoo import parallel as parallel_lib
from zoo.data import pipeline
from zoo.data.augment import make_augment
from zoo.data.datasets import dataset_from_config
from zoo.training import loop
from zoo.training import step as step_lib


def supervised_config():
    """resnet8 with BatchNorm and mixup/cutmix (the partner is the global batch's reverse) on
    Fashion-MNIST crops. A small lr: at lr 0.05 float32 round-off (the stem kernel's gradient
    sums 4,096 terms that cancel) already reached 3e-5 after 3 steps; at 0.02 the three
    agree to 2.4e-7."""
    c = common.base()
    c.model.name = "resnet8"
    c.data.batch_size = 16
    c.data.mixup_alpha, c.data.cutmix_alpha = 0.8, 1.0
    c.data.train_ops = "random_crop(padding=2)|flip"
    c.optim.lr = 0.02
    c.total_steps = 10
    return c


class Run:
    """The train step of `config` on `devices` in `mode`, from one initial state, fed the
    same first batches of the training split."""

    def __init__(self, config, devices, mode):
        config = config.copy_and_resolve_references()
        config.parallel.mode = mode
        spec = dataset_from_config(config.data)
        self.parts = loop.build(config, spec, step_lib.make_mesh(devices))
        self.parallel = self.parts.parallel
        self.state = self.parts.init(jax.random.PRNGKey(0))
        views = self.parts.method.views
        iterator = pipeline.train_iterator(spec, config.data, seed=0, views=views)
        self.batches = [next(iterator) for _ in range(3)]
        self.step = self.parallel.compile_train_step(
            method=self.parts.method,
            tx=self.parts.tx,
            augment=self.parts.augment,
            schedule=self.parts.schedule,
            grad_accum_steps=config.optim.grad_accum_steps,
        )

    def run(self):
        """(params, model_state after the steps as numpy, each step's host metrics)."""
        state = self.parallel.put_state(jax.tree.map(jnp.copy, self.state))  # donated
        history = []
        for batch in self.batches:
            state, metrics = self.step(state, self.parallel.put_batch(batch), jax.random.key(1))
            history.append(self.parallel.host(metrics))
        state = jax.device_get(self.parallel.get_state(state))
        return state.params, state.model_state, history


def assert_runs_agree(config, atol=1e-5):
    """jit and pmap on 8 devices give one device's metrics, parameters and BatchNorm
    statistics after the steps, within `atol` (absolute or relative: SimCLR's gradient norm
    of 88 differs in its 7th digit)."""
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    want_params, want_state, want_metrics = Run(config, jax.devices()[:1], "jit").run()
    for devices, mode in ((jax.devices(), "jit"), (jax.devices(), "pmap")):
        params, state, metrics = Run(config, devices, mode).run()
        for got, want in zip(metrics, want_metrics, strict=True):
            assert set(got) == set(want)
            for key in want:
                np.testing.assert_allclose(
                    got[key], want[key], rtol=atol, atol=atol, err_msg=f"{mode} {key}"
                )
        for got, want in zip(
            jax.tree.leaves((params, state)),
            jax.tree.leaves((want_params, want_state)),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=atol, atol=atol, err_msg=mode)
    return want_metrics


def test_batchnorm_resnet_with_mixup_same_under_jit_pmap_and_one_device():
    metrics = assert_runs_agree(supervised_config())
    assert metrics[0]["loss"] != metrics[1]["loss"] != metrics[2]["loss"]


def vit_dropout_config():
    """A 2-block ViT with dropout, attention dropout and drop-path: the masks are keyed by
    each example's global index, so jit, pmap and one device drop the same values."""
    c = common.base()
    c.model.name = "vit_tiny_patch16_224"
    c.model.patch_size, c.model.img_size, c.model.drop_path_rate = 4, 16, 0.2
    with c.unlocked():
        c.model.depth, c.model.dropout_rate, c.model.attn_dropout_rate = 2, 0.1, 0.1
    c.data.train_ops = "resize(size=16)|flip"
    c.data.batch_size = 16
    c.optim.name, c.optim.lr = "sgd", 0.02
    c.total_steps = 10
    return c


def test_vit_with_dropout_same_under_jit_pmap_and_one_device():
    assert_runs_agree(vit_dropout_config())


def simclr_config():
    """SimCLR on resnet8: NT-Xent over the negatives of every device (all_gather under pmap),
    BatchNorm in the backbone and the projector, colour jitter and blur per example."""
    c = common.base()
    c.model.name = "resnet8"
    c.data.batch_size = 16
    c.method.name = "simclr"
    c.method.crop_size, c.method.proj_hidden_dim, c.method.proj_dim = 16, 32, 16
    c.method.blur = True
    c.evals.names = "knn"
    c.optim.name, c.optim.lr, c.optim.weight_decay = "lars", 0.05, 1e-4
    c.total_steps = 10
    return c


def test_simclr_same_under_jit_pmap_and_one_device():
    # One device's loss has each query's 30 negatives: pmap matches it only if every
    # device's embeddings reach every other device (2 examples, 2 views each per device).
    assert_runs_agree(simclr_config())


def test_pmap_devices_draw_different_augmentations_of_the_same_image():
    """Every device gets the same two images; colour jitter (per example) differs between
    devices, while mixup's lam (per batch) is the one jit would draw."""
    augment = make_augment((0.5,), (0.5,), color_jitter=0.8, color_jitter_prob=1.0)
    image = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8)
    images = np.broadcast_to(image, (8, 2, 8, 8, 3))
    out = jax.pmap(
        lambda x: augment({"image": x}, jax.random.key(0), "data")["image"], axis_name="data"
    )(images)
    flat = np.asarray(out).reshape(16, -1)
    assert len({row.tobytes() for row in flat}) == 16  # 16 different augmentations
    jit_out = jax.jit(lambda x: augment({"image": x}, jax.random.key(0))["image"])(
        images.reshape(16, 8, 8, 3)
    )
    np.testing.assert_allclose(flat, np.asarray(jit_out).reshape(16, -1), atol=1e-6)


def test_reverse_and_example_index_see_the_global_batch():
    x = np.arange(16.0)
    got = jax.pmap(
        lambda v: (
            parallel_lib.reverse(v, "data"),
            parallel_lib.example_index(2, "data"),
        ),
        axis_name="data",
    )(x.reshape(8, 2))
    np.testing.assert_array_equal(np.asarray(got[0]).ravel(), x[::-1])
    np.testing.assert_array_equal(np.asarray(got[1]).ravel(), np.arange(16))


def no_batchnorm_config(batch_size, accumulate):
    """A 2-block ViT (LayerNorm, no dropout): its gradient does not depend on how the batch is
    cut, so k micro-batches must give the update of the whole batch. SGD: Adam's update of a
    near-zero gradient (m / sqrt(v)) turns its round-off into differences of 6e-5."""
    c = common.base()
    c.model.name = "vit_tiny_patch16_224"
    c.model.patch_size, c.model.img_size = 4, 16
    with c.unlocked():
        c.model.depth = 2
    c.data.train_ops = "resize(size=16)"
    c.data.batch_size = batch_size
    c.optim.lr = 0.1
    c.optim.grad_accum_steps = accumulate
    c.total_steps = 10
    return c


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_gradient_accumulation_equals_one_step_with_the_whole_batch(mode):
    devices = jax.devices()[:2]
    whole = Run(no_batchnorm_config(32, 1), devices, mode).run()
    accumulated = Run(no_batchnorm_config(32, 4), devices, mode).run()
    for got, want in zip(accumulated[2], whole[2], strict=True):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), accumulated[0], whole[0])


def test_micro_batches_take_each_device_share_in_turn():
    batch = {"x": np.arange(16)}
    got = step_lib.micro_batches(batch, steps=2, shards=4)["x"]
    # Device d holds rows 4d..4d+3; micro-batch j takes rows 4d+2j, 4d+2j+1 of each device.
    np.testing.assert_array_equal(got[0], [0, 1, 4, 5, 8, 9, 12, 13])
    np.testing.assert_array_equal(got[1], [2, 3, 6, 7, 10, 11, 14, 15])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"parallel.mode": "pmapp"}, "parallel.mode must be one of jit, pmap, got 'pmapp'"),
        ({"data.batch_size": 20}, r"data.batch_size=20 does not divide over the 8 device\(s\)"),
        (
            {"data.batch_size": 32, "optim.grad_accum_steps": 3},
            r"8 device\(s\) x optim.grad_accum_steps=3 \(24\).*e.g. 24 or 48",
        ),
        ({"optim.grad_accum_steps": 0}, "optim.grad_accum_steps must be >= 1"),
    ],
)
def test_bad_layouts_fail_before_anything_is_built(tmp_path, override, message):
    config = supervised_config()
    for key, value in override.items():
        section, field = key.split(".")
        config[section][field] = value
    with pytest.raises(ValueError, match=message):
        loop.run(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def default_run(tmp_path, monkeypatch, name, devices, mode, eval_batch_size):
    """configs/default.py for 3 steps on `devices`, evaluated on the 2,000 test images."""
    from configs import default

    config = default.get_config()
    config.total_steps, config.optim.lr = 3, 0.01
    config.parallel.mode, config.data.eval_batch_size = mode, eval_batch_size
    monkeypatch.setattr(loop, "make_mesh", lambda: step_lib.make_mesh(devices))
    return loop.run(config, tmp_path / name)


def test_default_config_trains_and_evaluates_on_eight_devices_in_both_modes(
    tmp_path, monkeypatch, capsys
):
    """The eval batch of 500 does not divide over 8 devices (padded to 504), and with 300
    the 2,000 images end in a batch of 200: both give the one-device accuracy exactly."""
    one = default_run(tmp_path, monkeypatch, "one", jax.devices()[:1], "jit", 500)
    jit = default_run(tmp_path, monkeypatch, "jit", jax.devices(), "jit", 500)
    pmap = default_run(tmp_path, monkeypatch, "pmap", jax.devices(), "pmap", 300)
    assert "on 8 cpu device(s) (pmap)" in capsys.readouterr().out
    for results in (jit, pmap):
        assert results["count"] == one["count"] == 2000
        assert results["accuracy"] == one["accuracy"]
        np.testing.assert_array_equal(results["confusion"], one["confusion"])
        np.testing.assert_allclose(results["loss"], one["loss"], rtol=1e-5)
