"""Layer-wise learning-rate decay (optim.layer_decay): the scale of every parameter of five
families against a plain-Python reference written from each family's block layout, and one
optimizer step against numpy (SGD, AdamW, with freeze_backbone)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_mu_dtype_keeps_the_first_moment_in_bfloat16(name):
    optim = common.base().optim
    optim.name, optim.mu_dtype = name, "bfloat16"
    tx, _ = optim_lib.build_optimizer(
        optim, common.base().schedule, total_steps=10, steps_per_epoch=10
    )
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(state) if x.ndim}
    # adamw: mu bfloat16, nu float32; sgd: the momentum trace bfloat16.
    assert dtypes == ({"bfloat16", "float32"} if name == "adamw" else {"bfloat16"})
    updates, _ = tx.update(params, state, params)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))


def test_mu_dtype_is_refused_for_lars():
    optim = common.base().optim
    optim.name, optim.mu_dtype = "lars", "bfloat16"
    with pytest.raises(ValueError, match="LARS keeps its momentum in float32"):
        optim_lib.build_optimizer(optim, common.base().schedule, total_steps=10, steps_per_epoch=10)
