"""Layer-wise learning-rate decay (optim.layer_decay): the scale of every parameter of five
families against a plain-Python reference written from each family's block layout, and one
optimizer step against numpy (SGD, AdamW, with freeze_backbone)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

import zoo
from configs import common
from zoo.training import optim as optim_lib

DECAY = 0.7


def shapes(name, size=224, **kw):
    model = zoo.create_model(name, **kw)
    rng = jax.random.PRNGKey(0)
    x = jnp.zeros((1, size, size, 3))
    return jax.eval_shape(lambda: model.init({"params": rng, "dropout": rng}, x, train=False))[
        "params"
    ]


def stage_blocks(depths, fmt, downsample=None):
    """[(prefixes of block i), ...] in forward order from per-stage depths; a stage's
    downsampling layer (when it has one, stages > 0) belongs to the stage's first block."""
    blocks = []
    for stage, depth in enumerate(depths):
        for index in range(depth):
            prefixes = [fmt.format(s=stage, b=index) + "/"]
            if downsample and stage > 0 and index == 0:
                prefixes.append(downsample.format(s=stage))
            blocks.append(prefixes)
    return blocks


# name: (blocks in forward order, top-level names of the embedding/stem layer)
FAMILIES = {
    "vit_tiny_patch16_224": (
        [[f"blocks_{i}/"] for i in range(12)],
        {"patch_embed", "pos_embed", "cls_token"},
    ),
    "swin_tiny_patch4_window7_224": (
        stage_blocks((2, 2, 6, 2), "layers_{s}_blocks_{b}", "layers_{s}_downsample/"),
        {"patch_embed"},
    ),
    "convnext_atto": (
        stage_blocks((2, 2, 6, 2), "stages_{s}/blocks_{b}", "stages_{s}/downsample_"),
        {"stem_0", "stem_1"},
    ),
    "resnet18": ([[f"layer{s + 1}_{b}/"] for s in range(4) for b in range(2)], {"conv1", "bn1"}),
    "efficientnet_b0": (
        stage_blocks((1, 2, 2, 3, 3, 4, 1), "blocks_{s}_{b}"),
        {"conv_stem", "bn1"},
    ),
}


def reference_scales(params, blocks, embed, decay):
    """{path: scale}: embed = layer 0, block i = layer i + 1, the rest = layer L (scale 1)."""
    top = len(blocks) + 1
    out = {}
    for path in traverse_util.flatten_dict(params):
        name = "/".join(path)
        layer = next(
            (i + 1 for i, prefixes in enumerate(blocks) if name.startswith(tuple(prefixes))),
            0 if path[0] in embed else top,
        )
        out[path] = decay ** (top - layer)
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_layer_scales_match_the_reference(name):
    params = shapes(name, num_classes=10)
    blocks, embed = FAMILIES[name]
    expected = reference_scales(params, blocks, embed, DECAY)
    got = traverse_util.flatten_dict(optim_lib.layer_scales(params, DECAY))
    assert got.keys() == expected.keys()
    wrong = {"/".join(p): (got[p], expected[p]) for p in got if not np.isclose(got[p], expected[p])}
    assert not wrong, f"{name}: (got, expected) scales differ for {wrong}"
    head = zoo.model_entry(name).head[0]
    assert all(s == 1.0 for p, s in got.items() if p[0] == head)  # the head: the full lr


def test_vit_layers_as_beit():
    """ViT-Tiny (depth 12): embeddings decay**13, first block decay**12, last block decay,
    final norm and head 1."""
    scales = optim_lib.layer_scales(shapes("vit_tiny_patch16_224", num_classes=10), DECAY)
    assert scales["pos_embed"] == scales["cls_token"] == pytest.approx(DECAY**13)
    assert scales["patch_embed"]["proj"]["kernel"] == pytest.approx(DECAY**13)
    assert scales["blocks_0"]["attn"]["qkv"]["kernel"] == pytest.approx(DECAY**12)
    assert scales["blocks_11"]["mlp"]["fc2"]["bias"] == pytest.approx(DECAY)
    assert scales["norm"]["scale"] == scales["head"]["kernel"] == 1.0


def optim_config(**overrides):
    config = common.base()
    config.optim.update(dict(weight_decay=0.0, momentum=0.0, nesterov=False, lr=0.1))
    config.optim.update(overrides)
    config.schedule.name = "constant"
    return config


def random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), tree)


def one_update(config, params, grads, head=()):
    """The first update of the run's optimizer (added to the params by optax.apply_updates)."""
    tx, _ = optim_lib.build_optimizer(config.optim, config.schedule, 10, 10, head=head)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return flat_numpy(updates)


def flat_numpy(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_sgd_step_moves_each_parameter_by_lr_scale_grad():
    blocks, embed = FAMILIES["resnet18"]
    params = random_like(shapes("resnet18", size=32, num_classes=10), 0)
    grads = random_like(params, 1)
    updates = one_update(optim_config(layer_decay=DECAY), params, grads)
    scales = reference_scales(params, blocks, embed, DECAY)
    g = flat_numpy(grads)
    for path in g:
        np.testing.assert_allclose(updates[path], -0.1 * scales[path] * g[path], rtol=1e-6)
    assert scales[("conv1", "kernel")] == pytest.approx(DECAY**9)  # 8 blocks + head


def test_adamw_step_is_scaled_with_weight_decay_mask():
    """AdamW with decoupled weight decay: every update (Adam's and the decay's) is the plain
    update times the parameter's scale."""
    blocks, embed = FAMILIES["resnet18"]
    params = random_like(shapes("resnet18", size=32, num_classes=10), 2)
    grads = random_like(params, 3)
    config = dict(name="adamw", lr=1e-3, weight_decay=0.05)
    plain = one_update(optim_config(**config), params, grads)
    decayed = one_update(optim_config(layer_decay=DECAY, **config), params, grads)
    scales = reference_scales(params, blocks, embed, DECAY)
    for path in plain:
        np.testing.assert_allclose(decayed[path], scales[path] * plain[path], rtol=1e-6)
    # The weight-decay mask still holds: a BN scale (a vector) moves by Adam's first step
    # only, -lr * g / (|g| + eps), while a kernel also decays by lr * wd * p.
    p, g = flat_numpy(params), flat_numpy(grads)
    for path, wd in ((("bn1", "scale"), 0.0), (("conv1", "kernel"), 0.05)):
        adam = g[path] / (np.abs(g[path]) + 1e-8)
        np.testing.assert_allclose(plain[path], -1e-3 * (adam + wd * p[path]), rtol=1e-5)
    assert scales[("conv1", "kernel")] == pytest.approx(DECAY**9)  # 8 blocks + head


def test_freeze_backbone_with_layer_decay():
    params = random_like(shapes("resnet18", size=32, num_classes=10), 4)
    grads = random_like(params, 5)
    config = optim_config(layer_decay=DECAY, freeze_backbone=True)
    updates = one_update(config, params, grads, head=("fc",))
    g = flat_numpy(grads)
    for path in g:
        expected = -0.1 * g[path] if path[0] == "fc" else np.zeros_like(g[path])
        np.testing.assert_allclose(updates[path], expected, rtol=1e-6)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, float("nan")])
def test_bad_layer_decay_is_an_error(value):
    config = optim_config(layer_decay=value)
    with pytest.raises(ValueError, match=r"optim.layer_decay must be in \(0, 1\]"):
        optim_lib.build_optimizer(config.optim, config.schedule, 10, 10)


def test_layer_decay_needs_known_blocks():
    config = optim_config(layer_decay=DECAY)
    tx, _ = optim_lib.build_optimizer(config.optim, config.schedule, 10, 10)
    params = {"dense": {"kernel": jnp.ones((2, 2))}, "out": {"kernel": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match="no transformer/residual blocks found"):
        tx.init(params)  # when the train state is built, before any compilation


def test_layer_decay_one_is_off():
    params = random_like(shapes("resnet18", size=32, num_classes=10), 6)
    grads = random_like(params, 7)
    off = one_update(optim_config(), params, grads)
    one = one_update(optim_config(layer_decay=1.0), params, grads)
    assert all(np.array_equal(off[k], one[k]) for k in off)


def test_config_key_exists_and_overrides_are_checked():
    assert common.base().optim.layer_decay == 1.0
    argv = ["train.py", "--config=configs/default.py", "--config.optim.layer_decay=0.8"]
    assert common.check_overrides(argv, "configs/default.py") is None
    message = common.check_overrides(
        ["train.py", "--config.optim.layer_dacay=0.8"], "configs/default.py"
    )
    assert "unknown config key 'optim.layer_dacay'" in message and "optim.layer_decay" in message
    assert isinstance(common.base().optim, ml_collections.ConfigDict)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb", "rmsprop_tf"])
def test_mu_dtype_keeps_the_first_moment_in_bfloat16(name):
    optim = common.base().optim
    optim.name, optim.mu_dtype = name, "bfloat16"
    tx, _ = optim_lib.build_optimizer(
        optim, common.base().schedule, total_steps=10, steps_per_epoch=10
    )
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(state) if x.ndim}
    # adamw, lamb: mu bfloat16, nu float32; sgd: the momentum trace bfloat16; rmsprop_tf:
    # the mean square float32, the momentum bfloat16.
    assert dtypes == ({"bfloat16"} if name == "sgd" else {"bfloat16", "float32"})
    updates, _ = tx.update(params, state, params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))


def test_mu_dtype_is_refused_for_lars():
    optim = common.base().optim
    optim.name, optim.mu_dtype = "lars", "bfloat16"
    with pytest.raises(ValueError, match="LARS keeps its momentum in float32"):
        optim_lib.build_optimizer(optim, common.base().schedule, total_steps=10, steps_per_epoch=10)


# --- LAMB, TensorFlow's RMSProp, the exponential schedule ----------------------------------


def toy_problem(seed=0, steps=4):
    """Parameters (a kernel that gets weight decay, a bias that does not) and a gradient for
    each of `steps` steps."""
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=2) * 0.1},
        "out": {"kernel": rng.normal(size=(2, 2))},
    }
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(steps)]
    as32 = lambda tree: jax.tree.map(lambda x: x.astype(np.float32), tree)  # noqa: E731
    return as32(params), [as32(g) for g in grads]


def run_optimizer(config, params, grads):
    """The params after one update per gradient, and the learning rate of each update; the
    schedule warms up over 2 of 8 steps, then decays."""
    tx, schedule = optim_lib.build_optimizer(config.optim, config.schedule, 8, 2)
    state, update = tx.init(params), jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return flat_numpy(params), [float(schedule(t)) for t in range(len(grads))]


def decayed(path) -> bool:
    return path[-1] == "kernel"  # decay_mask: matrices, not the bias


def test_lamb_is_timms_lamb():
    config = optim_config(name="lamb", lr=0.05, weight_decay=0.1, eps=1e-6, grad_clip_norm=1.0)
    config.optim.update(b1=0.9, b2=0.99)
    config.schedule.update(name="cosine", warmup_steps=2)
    params, grads = toy_problem()
    got, lrs = run_optimizer(config, params, grads)
    assert lrs[0] == 0.0 and lrs[1] > 0 and lrs[3] < 0.05  # the learning rate changes
    # timm's Lamb (decoupled_decay=False), in float64: clip the global norm at 1, Adam with
    # bias correction, + wd * w, times ||w|| / ||update|| where the parameter decays.
    w = {k: v.astype(np.float64) for k, v in flat_numpy(params).items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for t, (g, lr) in enumerate(zip(map(flat_numpy, grads), lrs, strict=True), start=1):
        norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))
        for k in w:
            grad = g[k] / max(norm / 1.0, 1.0)
            m[k] = 0.9 * m[k] + 0.1 * grad
            v[k] = 0.99 * v[k] + 0.01 * grad**2
            update = (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.99**t)) + 1e-6)
            if decayed(k):
                update = update + 0.1 * w[k]
                w_norm, u_norm = np.linalg.norm(w[k]), np.linalg.norm(update)
                update = update * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            w[k] = w[k] - lr * update
    for k in w:
        np.testing.assert_allclose(got[k], w[k], rtol=1e-6, atol=1e-6, err_msg=str(k))


def test_rmsprop_tf_is_timms_rmsprop_tf():
    config = optim_config(name="rmsprop_tf", lr=0.02, weight_decay=0.05, eps=1e-3, momentum=0.9)
    config.optim.rms_decay = 0.8
    config.schedule.update(name="exponential", warmup_steps=2, decay_rate=0.5, decay_epochs=0.5)
    params, grads = toy_problem(seed=1)
    got, lrs = run_optimizer(config, params, grads)
    # The decay counts from step 0 (TF): 0.02 * 0.5 ** step after the warmup.
    assert lrs == pytest.approx([0.0, 0.01, 0.005, 0.0025])  # the lr inside the buffer matters
    # timm's RMSpropTF in float64: L2 decay into the gradient, the mean square from ones, eps
    # in the square root, the learning rate in the momentum buffer.
    w = {k: v.astype(np.float64) for k, v in flat_numpy(params).items()}
    ms = {k: np.ones_like(v) for k, v in w.items()}
    buf = {k: np.zeros_like(v) for k, v in w.items()}
    for g, lr in zip(map(flat_numpy, grads), lrs, strict=True):
        for k in w:
            grad = g[k] + (0.05 * w[k] if decayed(k) else 0.0)
            ms[k] = ms[k] + (grad**2 - ms[k]) * (1 - 0.8)
            buf[k] = 0.9 * buf[k] + lr * grad / np.sqrt(ms[k] + 1e-3)
            w[k] = w[k] - buf[k]
    for k in w:
        np.testing.assert_allclose(got[k], w[k], rtol=1e-6, atol=1e-6, err_msg=str(k))


def test_exponential_schedule_is_a_staircase_counted_from_step_0():
    config = optim_config()
    config.schedule.update(name="exponential", warmup_steps=3, decay_rate=0.5, decay_epochs=1.5)
    schedule = optim_lib.build_schedule(config.schedule, 0.8, total_steps=40, steps_per_epoch=4)
    decay_steps = 6  # round(1.5 epochs * 4 steps)
    for step in range(30):
        want = 0.8 * step / 3 if step < 3 else 0.8 * 0.5 ** (step // decay_steps)
        assert float(schedule(step)) == pytest.approx(want, rel=1e-6), step
    config.schedule.update(warmup_steps=0, decay_epochs=0.01)  # at least one step per decay
    schedule = optim_lib.build_schedule(config.schedule, 0.8, total_steps=40, steps_per_epoch=4)
    assert [float(schedule(s)) for s in range(3)] == pytest.approx([0.8, 0.4, 0.2])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("decay_rate", 0.0, r"schedule.decay_rate must be in \(0, 1\]"),
        ("decay_epochs", 0.0, "schedule.decay_epochs must be > 0"),
    ],
)
def test_bad_exponential_schedule_is_an_error(key, value, message):
    config = optim_config()
    config.schedule.update({"name": "exponential", key: value})
    with pytest.raises(ValueError, match=message):
        optim_lib.build_optimizer(config.optim, config.schedule, 10, 10)


@pytest.mark.parametrize("name, close", [("lam", "lamb"), ("rmsprop", "rmsprop_tf")])
def test_unknown_optimizer_lists_close_matches(name, close):
    config = optim_config(name=name)
    with pytest.raises(ValueError, match=f"optim.name must be one of .*did you mean: {close}"):
        optim_lib.build_optimizer(config.optim, config.schedule, 10, 10)
