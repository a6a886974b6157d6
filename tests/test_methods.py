"""The self-supervised methods against plain numpy references and formulas, the Method
contract (registry, views, features), and one step on 8 devices equal to one device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from zoo.data import pipeline
from zoo.data.datasets import dataset_from_config, get_dataset
from zoo.methods import METHODS, base, byol, dino, simclr
from zoo.models import create_model
from zoo.training import loop
from zoo.training import step as step_lib

# ----------------------------------------------------------------------------- NT-Xent


def nt_xent_reference(z1: np.ndarray, z2: np.ndarray, temperature: float) -> float:
    """Chen et al. 2020, eq. 1, with a double loop: mean over the 2N anchors of
    -log(exp(s(i, pos) / T) / sum_{k != i} exp(s(i, k) / T)), s = cosine similarity."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        denominator = sum(math.exp(z[i] @ z[k] / temperature) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(z[i] @ z[positive] / temperature) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_equals_the_double_loop_reference(temperature):
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    loss, accuracy = simclr.nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature)
    assert float(loss) == pytest.approx(nt_xent_reference(z1, z2, temperature), rel=1e-5)
    assert 0.0 <= float(accuracy) <= 1.0


def test_nt_xent_of_collinear_embeddings_is_log_2n_minus_1():
    # Every similarity is 1: each anchor's softmax is uniform over its 2N - 1 candidates.
    n = 256
    z = jnp.tile(jnp.asarray([[0.6, -0.8, 0.0]]), (n, 1)) * jnp.arange(1, n + 1)[:, None]
    loss, _ = simclr.nt_xent(z, z, temperature=0.1)
    assert float(loss) == pytest.approx(math.log(2 * n - 1), rel=1e-6)  # 6.236 at N = 256


def test_nt_xent_under_pmap_gathers_the_negatives_of_every_device():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))
    per_device = jax.pmap(
        lambda a, b: simclr.nt_xent(a, b, 0.2, axis_name="data")[0], axis_name="data"
    )(z1.reshape(8, 2, 4), z2.reshape(8, 2, 4))
    # Equal local sizes: the mean of the devices' means is the global mean.
    assert float(jnp.mean(per_device)) == pytest.approx(nt_xent_reference(z1, z2, 0.2), rel=1e-5)


# ----------------------------------------------------------------------------- DINO


def test_dino_loss_of_a_uniform_student_is_log_k():
    k = 37
    rng = np.random.default_rng(0)
    teacher = [jnp.asarray(rng.normal(size=(5, k))) for _ in range(2)]
    student = [jnp.zeros((5, k))] * 4  # 2 global + 2 local views, all uniform
    loss, _ = dino.dino_loss(student, teacher, jnp.zeros(k), 0.1, 0.04)
    assert float(loss) == pytest.approx(math.log(k), rel=1e-6)


def test_dino_loss_minus_teacher_entropy_is_the_kl_divergence():
    k, rng = 11, np.random.default_rng(2)
    teacher = [rng.normal(size=(4, k)) for _ in range(2)]
    student = [rng.normal(size=(4, k)) for _ in range(3)]
    center, t_temp, s_temp = rng.normal(size=k) * 0.1, 0.07, 0.1
    loss, entropy = dino.dino_loss(
        [jnp.asarray(s) for s in student], [jnp.asarray(t) for t in teacher], center, s_temp, t_temp
    )

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    kls = []
    for i, t in enumerate(teacher):
        q = softmax((t - center) / t_temp)
        for v, s in enumerate(student):
            if v != i:
                p = softmax(s / s_temp)
                kls.append(np.mean(np.sum(q * (np.log(q) - np.log(p)), -1)))
    assert float(loss - entropy) == pytest.approx(np.mean(kls), rel=1e-4, abs=1e-6)
    assert float(loss - entropy) >= 0.0


def test_schedules_follow_their_formulas():
    total = 100
    for step in (0, 25, 50, 100, 150):
        t = min(step / total, 1.0)
        want = 1.0 - (1.0 - 0.996) * (math.cos(math.pi * t) + 1) / 2
        assert float(base.cosine_increase(step, total, 0.996)) == pytest.approx(want, rel=1e-6)
        temperature = dino.teacher_temperature(step, 0.04, 0.07, warmup_steps=50)
        assert float(temperature) == pytest.approx(0.04 + 0.03 * min(step / 50, 1.0), rel=1e-6)
    target, online = {"w": jnp.asarray([1.0, 2.0])}, {"w": jnp.asarray([3.0, -2.0])}
    np.testing.assert_allclose(base.ema(target, online, 0.9)["w"], [1.2, 1.6], rtol=1e-6)


def test_weight_decay_cosine_schedule():
    from zoo.training.optim import weight_decay_schedule

    optim = common.base().optim
    optim.weight_decay, optim.weight_decay_end = 0.04, 0.4
    schedule = weight_decay_schedule(optim, total_steps=10)
    assert [round(float(schedule(s)), 6) for s in (0, 5, 10)] == [0.04, 0.22, 0.4]


# ----------------------------------------------------------------------------- BYOL


def test_byol_regression_loss_is_0_for_identical_and_4_for_opposite_vectors():
    v = jnp.asarray([[3.0, -4.0, 12.0]])
    assert float(byol.regression_loss(v, 2 * v)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(byol.regression_loss(v, -v)[0]) == pytest.approx(4.0, rel=1e-6)
    w = jnp.asarray([[4.0, 3.0, 0.0]])  # orthogonal: 2
    assert float(byol.regression_loss(v, w)[0]) == pytest.approx(2.0, rel=1e-6)


# ----------------------------------------------------------------------------- the contract


def ssl_config(name: str):
    c = common.base()
    c.model.name = "resnet8"
    c.data.name = "fashion_mnist_mini"
    c.data.batch_size = 16
    c.method.name = name
    c.method.crop_size = 16
    c.method.proj_hidden_dim = 32
    c.method.proj_dim = 16
    c.method.out_dim = 64
    c.method.num_local_crops = 1 if name == "dino" else 0
    c.method.local_crop_size = 8
    c.method.blur = True
    c.method.freeze_last_layer_epochs = 0.0
    c.optim.name = "lars" if name != "dino" else "adamw"
    c.optim.lr = 0.5 if name != "dino" else 1e-3
    c.optim.weight_decay = 1e-4
    c.evals.names = "knn"
    c.total_steps = 10
    return c


def test_methods_are_registered_and_unknown_names_list_close_matches():
    assert {"supervised", "simclr", "byol", "dino"} <= set(METHODS.list())
    config = ssl_config("simclrr")
    with pytest.raises(ValueError, match="unknown method 'simclrr'; did you mean: simclr"):
        loop.is_classifier(config)


def test_pipeline_makes_exactly_the_views_a_method_declares():
    config = ssl_config("dino")
    spec = get_dataset("fashion_mnist_mini")
    method = loop.build(config, spec, step_lib.make_mesh(jax.devices()[:1])).method
    assert [v.key for v in method.views] == ["image", "image_1", "image_2"]
    assert method.views[0].photometric["blur_prob"] == 1.0
    assert method.views[1].photometric["solarize_prob"] == 0.2
    batch = next(pipeline.train_iterator(spec, config.data, seed=0, views=method.views))
    assert sorted(batch) == ["image", "image_1", "image_2", "label"]
    assert batch["image"].shape == batch["image_1"].shape == (16, 16, 16, 1)
    assert batch["image_2"].shape == (16, 8, 8, 1)
    assert not np.array_equal(batch["image"], batch["image_1"])  # two different crops


@pytest.mark.parametrize(
    "name, override, message",
    [
        ("simclr", {"evals.names": "classification"}, "has no classifier to evaluate"),
        ("simclr", {"data.name": "fashion_mnist_mini_mosaic"}, "multilabel"),
        ("dino", {"method.local_crop_size": 20}, "local_crop_size=20 in 1..16"),
        ("dino", {"model.name": "vit_tiny_patch16_224"}, "cannot take DINO's 8x8 crops"),
        ("byol", {"evals.names": "knm"}, "unknown evaluator 'knm'; did you mean: knn"),
        ("simclr", {"init_from": "weights.pth"}, "pretrains from scratch"),
    ],
)
def test_bad_method_settings_fail_before_compilation(name, override, message):
    config = ssl_config(name)
    for key, value in override.items():
        section, field = key.split(".") if "." in key else (None, key)
        (config[section] if section else config)[field] = value
    spec = dataset_from_config(config.data)
    with pytest.raises(ValueError, match=message):
        loop.build(config, spec, step_lib.make_mesh(jax.devices()[:1]))


class Step:
    """A method's train step on `devices` in `mode`, from the same initial state and batch."""

    def __init__(self, name: str, devices, mode: str = "jit"):
        config = ssl_config(name)
        config.parallel.mode = mode
        spec = dataset_from_config(config.data)
        self.parts = loop.build(config, spec, step_lib.make_mesh(devices))
        self.parallel = self.parts.parallel
        # On the host: the train step donates the state it is given.
        self.state = jax.device_get(self.parts.init(jax.random.PRNGKey(0)))
        self.batch = next(
            pipeline.train_iterator(spec, config.data, seed=0, views=self.parts.method.views)
        )
        self.step = self.parallel.compile_train_step(
            method=self.parts.method,
            tx=self.parts.tx,
            augment=self.parts.augment,
            schedule=self.parts.schedule,
        )

    def run(self, num_steps: int = 1):
        replicated = step_lib.shardings(self.parallel.mesh)[0]
        state, losses = self.parallel.put_state(jax.device_put(self.state, replicated)), []
        for _ in range(num_steps):
            batch = self.parallel.put_batch(self.batch)
            state, metrics = self.step(state, batch, jax.random.PRNGKey(1))
            metrics = self.parallel.host(metrics)
            losses.append(float(metrics["loss"]))
        return jax.device_get(self.parallel.get_state(state)), losses, metrics


_STEPS: dict = {}


def compiled_step(name: str, num_devices: int, mode: str = "jit") -> Step:
    """One compiled `Step` per method, device count and mode for the whole module."""
    if (name, num_devices, mode) not in _STEPS:
        _STEPS[name, num_devices, mode] = Step(name, jax.devices()[:num_devices], mode)
    return _STEPS[name, num_devices, mode]


# SimCLR: tests/test_parallel.py (jit and pmap on 8 devices against one). BYOL and DINO under
# pmap: BatchNorm of both networks synchronised, DINO's centre and the collapse monitors over
# every device's rows (jit on 8 devices runs the same code as on one, with global arrays).
@pytest.mark.parametrize("name", ["byol", "dino"])
def test_one_step_under_pmap_on_eight_devices_equals_one_device(name):
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    state1, losses1, _ = compiled_step(name, 1).run()
    state8, losses8, _ = compiled_step(name, 8, "pmap").run()
    np.testing.assert_allclose(losses1, losses8, rtol=0, atol=1e-5)
    for tree in ("params", "model_state", "extra"):
        leaves1 = jax.tree.leaves(getattr(state1, tree))
        leaves8 = jax.tree.leaves(getattr(state8, tree))
        assert len(leaves1) == len(leaves8) > 0 or tree == "extra"
        for a, b in zip(leaves1, leaves8, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=f"{name} {tree}")


@pytest.mark.parametrize("name", ["simclr", "byol", "dino"])
def test_ssl_steps_lower_the_loss_and_keep_their_state(name):
    setup = compiled_step(name, 1)
    state, losses, metrics = setup.run(6)
    if name == "dino":  # its targets move with the teacher and centre: no falling loss to test
        assert all(np.isfinite(losses)) and 0.5 < metrics["teacher_entropy"] < math.log(64)
    else:
        assert losses[-1] < losses[0], losses
    assert metrics["embedding_std"] > 0.05, "collapsed on the first steps"
    images = setup.batch["image"][:4].astype(np.float32) / 255.0
    features = setup.parts.method.features(state.params, state.model_state, state.extra, images)
    assert features.shape == (4, 64)  # resnet8's pooled features
    if name == "byol":  # the target moved towards the online network, by the EMA
        before, after = setup.state.extra["target"], state.extra["target"]
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
        assert any(jax.tree.leaves(moved))
    if name == "dino":
        assert int(state.extra["step"]) == 6 and np.any(state.extra["center"] != 0)


def test_dino_last_layer_gets_no_gradient_while_frozen():
    config = ssl_config("dino")
    spec = dataset_from_config(config.data)
    model = create_model("resnet8", num_classes=0)
    method = METHODS.get("dino")(config, model, spec, total_steps=10, steps_per_epoch=1)
    frozen = dino.dino(
        model,
        model,
        method.views,
        head=dino.DINOHead(out_dim=64, hidden_dim=32, bottleneck_dim=16),
        total_steps=10,
        ema_momentum=0.996,
        center_momentum=0.9,
        student_temp=0.1,
        teacher_temp=(0.04, 0.04),
        teacher_temp_warmup_steps=0,
        freeze_last_layer_steps=3,
    )
    batch = next(pipeline.train_iterator(spec, config.data, seed=0, views=method.views))
    batch = {k: jnp.asarray(v, jnp.float32) / 255.0 if k.startswith("image") else v
             for k, v in batch.items()}  # fmt: skip
    params, model_state, extra = frozen.init(jax.random.PRNGKey(0), batch)

    @jax.jit
    def gradients(step):
        def loss(p):
            e = {**extra, "step": step}
            return frozen.loss(p, model_state, e, batch, jax.random.PRNGKey(1), train=True)[0]

        return jax.grad(loss)(params)

    for step, want_zero in ((0, True), (2, True), (3, False)):
        grads = gradients(jnp.asarray(step, jnp.int32))
        magnitude = np.abs(np.asarray(grads["head"]["last_layer"])).max()
        assert (magnitude == 0.0) == want_zero, (step, magnitude)
        assert np.abs(np.asarray(grads["backbone"]["conv1"]["kernel"])).max() > 0


@pytest.mark.parametrize(
    "config_name",
    [
        "simclr_resnet18_cifar10",
        "byol_resnet18_cifar10",
        "dino_vit_small_cifar10",
        "simclr_fashion_mnist_mini",
        "byol_fashion_mnist_mini",
        "dino_fashion_mnist_mini",
    ],
)
def test_ssl_configs_build_their_method(config_name):
    import importlib

    config = importlib.import_module(f"configs.{config_name}").get_config()
    # The GPU recipes read tfds CIFAR-10, which is not here: their model, method and views are
    # checked on the embedded images instead (the crop sizes are the configs' own).
    config.data.name = "fashion_mnist_mini"
    spec = dataset_from_config(config.data)
    parts = loop.build(config, spec, step_lib.make_mesh(jax.devices()[:1]))
    assert parts.method.name == config.method.name and not parts.method.is_classifier
    assert len(parts.method.views) == 2 + config.method.num_local_crops

    def init(rng):
        return parts.method.init(rng, parts.augment(parts.example_batch, rng))

    params, _, _ = jax.eval_shape(init, jax.random.PRNGKey(0))  # shapes only: no compile
    assert "backbone" in params
